"""xdc_prewarm: a released dataset -> each datacenter's cache, verified file by file.

Started by a release event on Kafka (the ``xdc-release`` asset's watcher, topics and connection
from the config: the local datacenter's releases topic, connection ``kafka.airflow_conn_id`` or
``xdc_kafka``), by hand / REST with params {dataset, version, manifest, datacenters, prefix, select, root,
make_room}, and
every 10 minutes (``XDC_RECONCILE_SCHEDULE``, cron or ``none``): the ``reconcile`` task adds the
releases a datacenter has no result for (the releases topics against its release ledger and
registrations), which covers a release the watcher lost (its trigger commits the Kafka offset
before the asset event is stored).
`select` says where the paths are in a dataset index (JMESPath, or csv/parquet
columns), `root` joins relative paths ("s3://bucket/prefix", or {"": base, TAG: prefix} per
modality, as mmdet3d's data_prefix), `make_room` frees retired datasets when the warm would pass a
cache node's high watermark (without it such a plan is refused, naming them).

Per (release, datacenter), the phases of the one prewarm pipeline: resolve (the file list is
fetched and mapped once, kept in the datacenter's state) -> ready gate (every file mirrored into
the DC) -> plan (files, bytes, per-node shares, ETA; in the log and XCom) -> warm, mapped over the
cache nodes -> check (per file; re-warms stragglers, registers the dataset version as active
there; when the version became 100 % cached in the datacenter, an event on the asset
``xdc-ready-<dataset>-<dc>`` through the alias ``xdc-ready``, which training DAGs schedule on)
-> report (fails the run when any datacenter is not 100 % cached).
A datacenter whose cache Fluid runs (`cache.mode: fluid`) gets its units emitted instead of planned
and warmed: after its ready gate (asked of the object store), `emit` writes the list as Fluid
DataLoads to `cache.fluid.output` for Fluid's controller to load.
Imports inside tasks keep DAG parsing light (Airflow's advice); they are not hiding a cycle.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import (
    Asset,
    AssetAlias,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)

from xdc.app.airflow_support import (
    READY_ALIAS,
    parse_time_config,
    release_asset,
    release_watch,
    schedule_from_env,
)

CFG = parse_time_config()
RECONCILE = schedule_from_env("XDC_RECONCILE_SCHEDULE", "*/10 * * * *")
SCHEDULE = None  # no config while parsing: manual/REST runs only (a watcher on a guessed topic would crash-loop)
if CFG is not None:
    ASSET = release_asset(*release_watch(CFG))
    SCHEDULE = AssetOrTimeSchedule(timetable=CronTriggerTimetable(RECONCILE, timezone="UTC"), assets=[ASSET]) \
        if RECONCILE else [ASSET]
NONE_FAILED = "none_failed"  # a step mapped over nothing (all cached, no release for us) is skipped


@dag(dag_id="xdc_prewarm", schedule=SCHEDULE, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     catchup=False, tags=["xdc"], doc_md=__doc__,
     params={
         "dataset": Param(None, type=["null", "string"], description="dataset name (manual runs)"),
         "version": Param(None, type=["null", "string"]),
         "manifest": Param(None, type=["null", "string"], description="file list: s3://bucket/key or a path"),
         "datacenters": Param([], type="array", description="default: the config's prewarm datacenters"),
         "prefix": Param(None, type=["null", "string"], description="keys must stay under bucket/prefix"),
         "select": Param(None, type=["null", "string"],
                         description="where the paths are in an index: JMESPath (pkl/json/jsonl) or columns"),
         "root": Param(None, type=["null", "string", "object"],
                       description='joined to relative paths: "s3://bucket/prefix" or {"": base, TAG: prefix}'),
         "make_room": Param(False, type="boolean",
                            description="free retired datasets when a node would pass its high watermark"),
         "ready_timeout": Param(None, type=["null", "number"], description="seconds; default from the config"),
     })
def xdc_prewarm() -> None:
    @task
    def releases() -> list[dict]:
        """The releases of this run: from the triggering asset events and/or the params."""
        from xdc.app.airflow_support import release_payloads
        from xdc.app.airflow_tasks import release_from_params

        ctx = get_current_context()
        out = release_payloads(ctx)
        manual = release_from_params(ctx["params"])
        if manual is not None:
            out.append(manual)
        return out

    @task
    def reconcile() -> list[dict]:
        """Units for releases some datacenter has no result for (past prewarm.reconcile_after_seconds)."""
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import reconcile_units

        return reconcile_units(load_xdc_config())

    @task
    def units(releases: list[dict], owed: list[dict]) -> list[dict]:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import prewarm_units

        return prewarm_units(load_xdc_config(), releases, owed)

    @task
    def resolve(unit: dict) -> dict:
        """Fetch and resolve the file list once; later tasks read it from the datacenter's state."""
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import unit_resolve

        return unit_resolve(load_xdc_config(), unit)

    @task
    def ready(unit: dict, params: dict | None = None) -> dict:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import unit_ready

        return unit_ready(load_xdc_config(), unit, (params or {}).get("ready_timeout"))

    @task
    def plan(unit: dict) -> dict:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import unit_plan

        return unit_plan(load_xdc_config(), unit)

    @task
    def node_jobs(plans: list[dict]) -> list[dict]:
        from xdc.app.airflow_tasks import warm_jobs

        return warm_jobs(plans)

    @task
    def warm(job: dict) -> dict:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import warm_node_job

        return warm_node_job(load_xdc_config(), job)

    @task(trigger_rule=NONE_FAILED, outlets=[AssetAlias(READY_ALIAS)])
    def check(unit: dict, warms: list[dict] | None = None) -> dict:
        """Per file; re-warms stragglers; when the version became 100 % cached in the unit's
        datacenter, an event on the asset xdc-ready-<dataset>-<dc> (extra: version, files, bytes,
        cached share, time) starts the DAGs scheduled on it."""
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import ready_assets, unit_check

        out = unit_check(load_xdc_config(), unit, list(warms or []))
        events = get_current_context()["outlet_events"][AssetAlias(READY_ALIAS)]
        for name, extra in ready_assets(out):
            events.add(Asset(name), extra=extra)
        return out

    @task
    def warm_units(gated: list[dict]) -> list[dict]:
        from xdc.app.airflow_tasks import units_in_mode

        return units_in_mode(gated, "warm")

    @task
    def fluid_units(gated: list[dict]) -> list[dict]:
        from xdc.app.airflow_tasks import units_in_mode

        return units_in_mode(gated, "fluid")

    @task
    def emit(unit: dict) -> dict:
        """Write the unit's list as Fluid DataLoads (cache.mode: fluid)."""
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import unit_emit

        return unit_emit(load_xdc_config(), unit)

    @task(trigger_rule=NONE_FAILED)
    def report(checks: list[dict] | None = None, emitted: list[dict] | None = None) -> list[dict]:
        from xdc.app.airflow_tasks import prewarm_outcome

        return prewarm_outcome(list(checks or []), list(emitted or []))

    gated = ready.expand(unit=resolve.expand(unit=units(releases(), reconcile())))
    to_warm = warm_units(gated)
    plans = plan.expand(unit=to_warm)
    warmed = warm.expand(job=node_jobs(plans))
    report(check.partial(warms=warmed).expand(unit=to_warm), emit.expand(unit=fluid_units(gated)))


xdc_prewarm()
