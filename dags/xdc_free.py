"""xdc_free: evict a dataset (or a file list) from each datacenter's cache, by hand or REST.

Params: dataset (its registered manifest is used when no manifest is given), version (default:
the active one), manifest, datacenters (default: the config's prewarm datacenters), force (also
evict files another active dataset still uses; the report names them). Mapped over datacenters.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task


@dag(dag_id="xdc_free", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     tags=["xdc"], doc_md=__doc__,
     params={
         "dataset": Param(None, type=["null", "string"]),
         "version": Param(None, type=["null", "string"]),
         "manifest": Param(None, type=["null", "string"], description="file list: s3://bucket/key or a path"),
         "datacenters": Param([], type="array"),
         "force": Param(False, type="boolean"),
     })
def xdc_free() -> None:
    @task
    def units(params: dict | None = None) -> list[dict]:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import free_units

        return free_units(load_xdc_config(), params or {})

    @task
    def free(unit: dict) -> dict:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import free_unit

        return free_unit(load_xdc_config(), unit)

    @task(trigger_rule="none_failed")
    def report(results: list[dict]) -> list[dict]:
        from xdc.app.airflow_tasks import free_outcome

        return free_outcome(results)

    report(free.expand(unit=units()))


xdc_free()
