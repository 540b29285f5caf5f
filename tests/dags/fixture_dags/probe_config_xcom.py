"""Probe DAG: a TaskFlow task reads the xdc config path and returns it (an XCom)."""
from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(dag_id="xdc_probe_config", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def xdc_probe_config():
    @task
    def read_config_path() -> str:
        from xdc.app.airflow_support import config_path

        return config_path()

    @task
    def releases() -> list[dict]:
        from airflow.sdk import get_current_context

        from xdc.app.airflow_support import release_payloads

        return release_payloads(get_current_context())

    read_config_path()
    releases()


xdc_probe_config()
