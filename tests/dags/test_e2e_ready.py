"""Ready for the training job, with real Airflow processes: a DAG scheduled on a dataset's ready asset
in datacenter B (`xdc-ready-<dataset>-B`) runs only once that dataset is 100 % cached in B.

The dataset is warmed into A first: its ready asset in A gets an event, the training DAG does not
run. Then into B: the check task's asset event starts the training DAG, whose task finds every
file of the dataset cached in B. The `dataset.ready` events are on each datacenter's releases topic.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from cache_client.prewarm.pipeline import Request, check_list
from devtools.airflow_local import running_airflow, task_instances
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.support import brokers, read_topic, site, topo
from xdc.app.airflow_support import (
    DEFAULT_KAFKA_CONN_ID,
    kafka_connection_env,
    ready_asset_name,
)
from xdc.config import XdcConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixture_dags"
SRC = "idca-drive"
QUIET_S = 10  # scheduler loops (1 s heartbeat) in which a wrongly scheduled training run would appear


def _t(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@pytest.mark.slow
def test_training_dag_runs_only_after_its_dataset_is_cached_in_its_datacenter(
        xcfg: XdcConfig, tmp_path: Path, tag: str, config_writer: Callable[..., Path],
        file_maker: Callable[..., dict[str, bytes]], airflow_db: str) -> None:
    files = file_maker(tmp_path / "src", tag, 4)
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, "camera/")
    with Mirror(topo(xcfg, "B"), group_id=f"{tag}-lib-mirror") as m:
        assert m.run(once=True).applied == 4
    listing = tmp_path / "release.txt"
    listing.write_text("".join(f"{SRC}/{k}\n" for k in files))
    cfg = load_config(config_writer(xcfg, tmp_path / "xdc.yaml", tag))
    dataset = f"ds-{tag}"
    dags = tmp_path / "dags"
    dags.mkdir()
    for f in [*(ROOT / "dags").glob("*.py"), FIXTURES / "train_on_ready.py"]:
        shutil.copy(f, dags / f.name)

    conn_name, conn_value = kafka_connection_env(DEFAULT_KAFKA_CONN_ID, brokers(cfg, "A"), f"{tag}-airflow")
    env = {conn_name: conn_value, "XDC_CONFIG": str(tmp_path / "xdc.yaml"),
           "XDC_TRAIN_DATASET": dataset, "XDC_TRAIN_DC": "B",
           "XDC_MIRROR_SCHEDULE": "none", "XDC_RESIZE_SCHEDULE": "none", "XDC_LAG_SCHEDULE": "none"}
    env |= {k: v for k, v in os.environ.items() if k.startswith("XDC_") and k.endswith(("_ACCESS_KEY", "_SECRET_KEY"))}
    conf = {"dataset": dataset, "version": "v1", "manifest": str(listing)}
    with running_airflow(tmp_path / "airflow", dags, extra_env=env, database_url=airflow_db) as af:
        af.wait_dag("xdc_prewarm")
        af.wait_dag("train_on_ready")

        # 1. 100 % cached in A only: A's ready asset gets its event, the training DAG (on B's) does not run
        run_a = af.trigger_dag("xdc_prewarm", conf | {"datacenters": ["A"]})
        run_a = af.wait_run("xdc_prewarm", run_a["dag_run_id"], timeout=300)
        assert run_a["state"] == "success", af.log_tails(60)
        (ev_a,) = af.asset_events(ready_asset_name(dataset, "A"))
        assert ev_a["extra"]["dc"] == "A" and ev_a["extra"]["cached_ratio"] == 1.0
        assert check_list(site(cfg, "B"), Request(str(listing))).bytes_cached == 0
        time.sleep(QUIET_S)
        assert af.list_runs("train_on_ready") == [], "trained on data that is not cached in B"
        assert af.asset_events(ready_asset_name(dataset, "B")) == []

        # 2. warmed into B: the check task's asset event starts the training DAG
        run_b = af.trigger_dag("xdc_prewarm", conf | {"datacenters": ["B"]})
        run_b = af.wait_run("xdc_prewarm", run_b["dag_run_id"], timeout=300)
        assert run_b["state"] == "success", af.log_tails(60)
        checked = [t for t in task_instances(af, "xdc_prewarm", run_b["dag_run_id"]) if t["task_id"] == "check"]
        train = af.wait_run("train_on_ready", af.wait_new_run("train_on_ready", timeout=120)["dag_run_id"], timeout=180)
        assert train["state"] == "success" and train["run_type"] == "asset_triggered", af.log_tails(60)
        seen = af.xcom("train_on_ready", train["dag_run_id"], "train")
        assert len(af.list_runs("train_on_ready")) == 1

    assert (seen["files"], seen["complete"], seen["cached_ratio"]) == (4, True, 1.0)
    assert seen["started"] >= max(_t(t["end_date"]) for t in checked) - 1.0  # after B's check finished
    (extra,) = seen["extras"]
    assert {k: extra[k] for k in ("dataset", "version", "dc", "files", "bytes", "cached_ratio", "manifest")} == {
        "dataset": dataset, "version": "v1", "dc": "B", "files": 4, "bytes": 4 * 40_000, "cached_ratio": 1.0,
        "manifest": str(listing)}
    assert extra["time"].endswith("Z")

    # the same news on Kafka: one dataset.ready per datacenter, on its releases topic
    for dc in ("A", "B"):
        msgs = [json.loads(r.value) for r in read_topic(cfg, dc, cfg.dc(dc).kafka.topics.releases)]
        ready = [m for m in msgs if m.get("type") == "dataset.ready"]
        assert [(m["dataset"], m["version"], m["dc"], m["files"], m["cached_ratio"]) for m in ready] == [
            (dataset, "v1", dc, 4, 1.0)]
