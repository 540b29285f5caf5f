"""End to end with real Airflow processes: a release published on Kafka starts xdc_prewarm through
the AssetWatcher (triggerer -> asset event -> scheduler), which leaves both caches 100 % warm."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cache_client.prewarm.pipeline import Request, check_list
from cache_client.prewarm.release import publish_release
from devtools.airflow_local import running_airflow, task_instances
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.support import brokers, site, topo
from xdc.app.airflow_support import DEFAULT_KAFKA_CONN_ID, kafka_connection_env
from xdc.config import XdcConfig, load_config
from xdc.events import ReleaseEvent

ROOT = Path(__file__).resolve().parents[2]
SRC = "idca-drive"


@pytest.mark.slow
def test_release_on_kafka_prewarms_both_caches(xcfg: XdcConfig, tmp_path: Path, tag: str,
                                                config_writer: Callable[..., Path],
                                                file_maker: Callable[..., dict[str, bytes]],
                                                airflow_db: str) -> None:
    t0 = time.monotonic()
    files = file_maker(tmp_path / "src", tag, 4)
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, "camera/")
    # Mirror into IDC-B while Airflow starts (two cores: overlap the waits, not the CPU work).
    mirrored: list[int] = []

    def mirror() -> None:
        with Mirror(topo(xcfg, "B"), group_id=f"{tag}-lib-mirror") as m:
            mirrored.append(m.run(once=True).applied)

    mirror_thread = threading.Thread(target=mirror, name="mirror-into-B")
    mirror_thread.start()
    listing = tmp_path / "release.txt"
    listing.write_text("".join(f"{SRC}/{k}\n" for k in files))
    config = config_writer(xcfg, tmp_path / "xdc.yaml", tag)
    cfg = load_config(config)

    conn_name, conn_value = kafka_connection_env(DEFAULT_KAFKA_CONN_ID, brokers(cfg, "A"), f"{tag}-airflow")
    env = {conn_name: conn_value, "XDC_CONFIG": str(config),
           # Only the release path runs here: the minute-scheduled DAGs stay manual.
           "XDC_MIRROR_SCHEDULE": "none", "XDC_RESIZE_SCHEDULE": "none", "XDC_LAG_SCHEDULE": "none",
           # and the prewarm DAG's reconcile timer off: the run under test is the one the release starts
           "XDC_RECONCILE_SCHEDULE": "none"}
    env |= {k: v for k, v in os.environ.items() if k.startswith("XDC_") and k.endswith(("_ACCESS_KEY", "_SECRET_KEY"))}
    try:
        with running_airflow(tmp_path / "airflow", ROOT / "dags", extra_env=env,
                             database_url=airflow_db) as af:
            started_s = af.started_s
            mirror_thread.join(timeout=120)
            assert mirrored == [4], f"the mirror into IDC-B applied {mirrored}, not [4]"
            af.wait_dag("xdc_prewarm")
            release = ReleaseEvent(dataset=f"ds-{tag}", version="v1", manifest=str(listing), time=time.time(),
                                   datacenters=("A", "B"))
            publish_release(site(cfg, "A"), release)
            t_sent = time.monotonic()
            run = af.wait_run("xdc_prewarm", af.wait_new_run("xdc_prewarm", timeout=90)["dag_run_id"], timeout=300)
            release_s = time.monotonic() - t_sent
            report = af.xcom("xdc_prewarm", run["dag_run_id"], "report") if run["state"] == "success" else None
            tails = af.log_tails(60) if run["state"] != "success" else ""
            tis = task_instances(af, "xdc_prewarm", run["dag_run_id"])
    finally:
        mirror_thread.join(timeout=120)  # also when Airflow did not start
    assert run["state"] == "success" and run["run_type"] == "asset_triggered", tails
    assert {(r["dc"], r["complete"]) for r in report} == {("A", True), ("B", True)}
    for dc in ("A", "B"):
        check = check_list(site(cfg, dc), Request(str(listing)))
        assert check.complete and check.cached_ratio == 1.0 and len(check.files) == 4, check.summary()
    assert {t["task_id"] for t in tis} == {"releases", "reconcile", "units", "resolve", "ready", "warm_units", "plan",
                                         "node_jobs", "warm", "check", "fluid_units", "emit", "report"}
    assert sum(t["task_id"] == "warm" for t in tis) == 4  # mapped over 2 datacenters x 2 cache nodes
    busy = " ".join(f"{t['task_id']}{'' if t['map_index'] < 0 else t['map_index']}={t['duration'] or 0:.1f}s" for t in tis)
    print(f"\ntask durations: {busy}")
    print(f"airflow healthy after {started_s:.1f}s; release on Kafka -> prewarm run done in {release_s:.1f}s; "
          f"test wall {time.monotonic() - t0:.1f}s")
