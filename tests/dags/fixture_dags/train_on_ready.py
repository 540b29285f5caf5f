"""Stand-in for a training job: scheduled on a dataset's ready asset in one datacenter.

Which dataset and datacenter: env XDC_TRAIN_DATASET / XDC_TRAIN_DC (read while parsing). The task
does what a careful training job would before reading: it checks, per file, that the data the
asset event announced is cached in its datacenter, and returns what it saw (with when it ran).
"""
from __future__ import annotations

import os

import pendulum
from airflow.sdk import Asset, dag, get_current_context, task

from xdc.app.airflow_support import ready_asset_name

DATASET = os.environ.get("XDC_TRAIN_DATASET", "example")
DC = os.environ.get("XDC_TRAIN_DC", "B")
READY = Asset(ready_asset_name(DATASET, DC))


@dag(dag_id="train_on_ready", schedule=[READY], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def train_on_ready():
    @task
    def train() -> dict:
        import time

        from cache_client.prewarm.pipeline import Request, check_list
        from xdc.app.airflow_support import load_xdc_config
        from xdc.topology import Topology

        started = time.time()
        events = list(get_current_context()["triggering_asset_events"][READY])
        extras = [dict(e.extra) for e in events]
        with Topology(load_xdc_config(), DC) as topo:
            check = check_list(topo.here, Request(extras[-1]["manifest"]))
        return {"started": started, "extras": extras, "files": len(check.files), "complete": check.complete,
                "cached_ratio": check.cached_ratio}

    train()


train_on_ready()
