"""xdc_mirror: every minute, one bounded mirror pass into each datacenter some route targets.

One task per target datacenter (from the config at parse time), each updating the asset
``xdc-dc-<DC>`` with its stats. Schedule: env XDC_MIRROR_SCHEDULE (cron, default every minute;
"none" for manual only); a pass stops when caught up or after XDC_MIRROR_MAX_SECONDS (default 50).
"""
from __future__ import annotations

import os

import pendulum
from airflow.sdk import Asset, dag, task

from xdc.app.airflow_support import dc_asset_name, mirror_targets, parse_time_config, schedule_from_env

CFG = parse_time_config()
TARGETS = mirror_targets(CFG) if CFG is not None else []
MAX_SECONDS = float(os.environ.get("XDC_MIRROR_MAX_SECONDS", "50"))


def _mirror_task(dc: str):  # noqa: ANN202 - an Airflow task factory
    asset = Asset(dc_asset_name(dc))

    @task(task_id=f"mirror_into_{dc}", outlets=[asset])
    def mirror_into(**context) -> dict:  # noqa: ANN003
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import mirror_into as run

        stats = run(load_xdc_config(), dc, MAX_SECONDS)
        context["outlet_events"][asset].extra = {k: stats[k] for k in ("records", "applied", "dead_letters")}
        return stats

    return mirror_into()


@dag(dag_id="xdc_mirror", schedule=schedule_from_env("XDC_MIRROR_SCHEDULE"),
     start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, max_active_runs=1,
     tags=["xdc"], doc_md=__doc__)
def xdc_mirror() -> None:
    if not TARGETS:
        @task
        def no_routes() -> None:
            """The config could not be read while parsing (or names no routes): say why."""
            from xdc.app.airflow_support import load_xdc_config
            from xdc.errors import ConfigError

            load_xdc_config()  # raises the ConfigError that explains what is missing
            raise ConfigError("the config names no routes: nothing to mirror (the DAG re-parses it)")

        no_routes()
    for dc in TARGETS:
        _mirror_task(dc)


xdc_mirror()
