"""xdc_prewarm: a released dataset -> each datacenter's cache, verified file by file.

Started by a release event on Kafka (the ``xdc-release`` asset's watcher, topics and connection
from the config: the local datacenter's releases topic, connection ``kafka.airflow_conn_id`` or
``xdc_kafka``), or by hand / REST with params {dataset, version, manifest, datacenters, prefix}.

Per (release, datacenter), the phases of the one prewarm pipeline: resolve (the file list is
fetched and mapped once, kept in the datacenter's state) -> ready gate (every file mirrored into
the DC) -> plan (files, bytes, per-node shares, ETA; in the log and XCom) -> warm, mapped over the
cache nodes -> check (per file; re-warms stragglers, registers the dataset version as active
there) -> report (fails the run when any datacenter is not 100 % cached).
A datacenter whose cache Fluid runs (`cache.mode: fluid`) gets its units emitted instead of planned
and warmed: after its ready gate (asked of the object store), `emit` writes the list as Fluid
DataLoads to `cache.fluid.output` for Fluid's controller to load.
Imports inside tasks keep DAG parsing light (Airflow's advice); they are not hiding a cycle.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from xdc.app.airflow_support import parse_time_config, release_asset, release_watch

CFG = parse_time_config()
# No config while parsing: manual/REST runs only (a watcher on a guessed topic would crash-loop).
SCHEDULE = [release_asset(*release_watch(CFG))] if CFG is not None else None
NONE_FAILED = "none_failed"  # a step mapped over nothing (all cached, no release for us) is skipped


@dag(dag_id="xdc_prewarm", schedule=SCHEDULE, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     catchup=False, tags=["xdc"], doc_md=__doc__,
     params={
         "dataset": Param(None, type=["null", "string"], description="dataset name (manual runs)"),
         "version": Param(None, type=["null", "string"]),
         "manifest": Param(None, type=["null", "string"], description="file list: s3://bucket/key or a path"),
         "datacenters": Param([], type="array", description="default: the config's prewarm datacenters"),
         "prefix": Param(None, type=["null", "string"], description="keys must stay under bucket/prefix"),
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
    def units(releases: list[dict]) -> list[dict]:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import prewarm_units

        return prewarm_units(load_xdc_config(), releases)

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

    @task(trigger_rule=NONE_FAILED)
    def check(unit: dict, warms: list[dict] | None = None) -> dict:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import unit_check

        return unit_check(load_xdc_config(), unit, list(warms or []))

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

    gated = ready.expand(unit=resolve.expand(unit=units(releases())))
    to_warm = warm_units(gated)
    plans = plan.expand(unit=to_warm)
    warmed = warm.expand(job=node_jobs(plans))
    report(check.partial(warms=warmed).expand(unit=to_warm), emit.expand(unit=fluid_units(gated)))


xdc_prewarm()
