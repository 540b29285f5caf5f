"""xdc_resize: new 4K frames in the landing datacenter -> 720p derivatives.

Dynamic task mapping over worker shards: ``shards`` says how many resize workers to run (param
``shards``, default env XDC_RESIZE_SHARDS or 2, at most one per partition of the events topic);
each mapped task is one ResizeWorker of the same consumer group, run until caught up. Schedule:
env XDC_RESIZE_SCHEDULE (cron, default every minute).
"""
from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, dag, task

from xdc.app.airflow_support import schedule_from_env

MAX_SECONDS = float(os.environ.get("XDC_RESIZE_MAX_SECONDS", "50"))


@dag(dag_id="xdc_resize", schedule=schedule_from_env("XDC_RESIZE_SCHEDULE"),
     start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, max_active_runs=1, tags=["xdc"],
     params={"shards": Param(int(os.environ.get("XDC_RESIZE_SHARDS", "2")), type="integer", minimum=1)},
     doc_md=__doc__)
def xdc_resize() -> None:
    @task
    def shards(params: dict | None = None) -> list[dict]:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import resize_shards

        got = resize_shards(load_xdc_config(), (params or {}).get("shards", 2))
        return [{"shard": s, "of": len(got)} for s in got]

    @task
    def resize(job: dict) -> dict:
        from xdc.app.airflow_support import load_xdc_config
        from xdc.app.airflow_tasks import resize_shard

        return resize_shard(load_xdc_config(), job["shard"], job["of"], MAX_SECONDS)

    @task
    def summary(results: list[dict]) -> dict:
        from xdc.app.airflow_tasks import sum_resize_stats

        return sum_resize_stats(results)

    summary(resize.expand(job=shards()))


xdc_resize()
