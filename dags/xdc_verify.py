"""xdc_verify: every day, each route's source listing against its target listing (rclone check):
missing / extra / differ / match counts in the log and in the target's state (the dashboard's
"last verify"), the drift gauge for the alert, and, unless disabled, the repairs published.

Schedule: env XDC_VERIFY_SCHEDULE (cron, default daily; "none" for manual only). Param `repair`
(default env XDC_VERIFY_REPAIR, else true).
"""
from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, dag, task

from xdc.app.airflow_support import schedule_from_env

REPAIR = os.environ.get("XDC_VERIFY_REPAIR", "true").strip().lower() not in ("0", "false", "no")


@dag(dag_id="xdc_verify", schedule=schedule_from_env("XDC_VERIFY_SCHEDULE", "@daily"),
     start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, max_active_runs=1, tags=["xdc"],
     params={"repair": Param(REPAIR, type="boolean")}, doc_md=__doc__)
def xdc_verify() -> None:
    @task
    def routes() -> list[str]:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import verify_routes

        return verify_routes(load_xdc_config())

    @task
    def verify(route: str, **context) -> dict:  # noqa: ANN003
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import verify_one

        return verify_one(load_xdc_config(), route, bool(context["params"]["repair"]))

    @task
    def report(reports: list[dict]) -> dict:
        from xdc.app.airflow_tasks import verify_outcome

        return verify_outcome(list(reports))

    report(verify.expand(route=routes()))


xdc_verify()
