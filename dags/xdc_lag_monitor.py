"""xdc_lag_monitor: every minute, a lag snapshot of every route (the dashboard's rows), and a
failed run when a route's p99 lag is over ``lag.objective_p99_seconds``.

Schedule: env XDC_LAG_SCHEDULE (cron, default every minute).
"""
from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from xdc.app.airflow_support import schedule_from_env


@dag(dag_id="xdc_lag_monitor", schedule=schedule_from_env("XDC_LAG_SCHEDULE"),
     start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, max_active_runs=1, tags=["xdc"],
     doc_md=__doc__)
def xdc_lag_monitor() -> None:
    @task
    def targets() -> list[str]:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import lag_targets

        return lag_targets(load_xdc_config())

    @task
    def snapshot(dc: str) -> dict:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import lag_snapshot

        return lag_snapshot(load_xdc_config(), dc)

    @task
    def objective(snapshots: list[dict]) -> dict:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import enforce_lag_objective

        return enforce_lag_objective(load_xdc_config(), list(snapshots))

    objective(snapshot.expand(dc=targets()))


xdc_lag_monitor()
