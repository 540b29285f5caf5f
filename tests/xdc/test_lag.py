"""Lag snapshots against the catalog's truth after real mirror runs on the local stack."""
from __future__ import annotations

import time

from mirror.catalog import SqliteCatalog
from mirror.events import new_sequencer
from mirror.runner import Mirror
from tests.support import delete_event, produce, put_event
from xdc.config import XdcConfig
from xdc.lag import Backlog, committed_offsets, lag_over_objective, lag_stats, prewarm_progress, record_lag_snapshot, \
    record_prewarm_progress
from xdc.metrics import Metrics, new_registry
from xdc.stats import percentile

SRC = "idca-drive"


def _mirror(cfg: XdcConfig) -> None:
    with Mirror(cfg, "B", metrics=Metrics(new_registry())) as m:
        m.run(once=True)


def _gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- pure --------------------------------------------------------------------------------------
def test_lag_stats_and_objective() -> None:
    assert lag_stats([]) == {"events": 0, "p50": None, "p99": None, "max": None}
    s = lag_stats([0.1 * i for i in range(1, 101)])
    assert s["events"] == 100 and s["p50"] == percentile([0.1 * i for i in range(1, 101)], 50)
    assert s["max"] == max(0.1 * i for i in range(1, 101))
    assert not lag_over_objective([{"p99": None}, {"p99": 59.0}], 60)
    assert lag_over_objective([{"p99": 1.0}, {"p99": 61.0}], 60)


def test_backlog_counts_routes_and_scales_a_sample(xcfg: XdcConfig) -> None:
    routes = xcfg.routes_into("B")
    bl = Backlog("t", highwater={0: 10}, committed={0: 6})
    bl.count(put_event(SRC, "camera/a.jpg", seq="01", size=100)[1], routes)
    bl.count(put_event(SRC, "lidar/b.bin", seq="02", size=7)[1], routes)
    bl.count(delete_event(SRC, "lidar/c.bin", seq="03")[1], routes)
    bl.count(b"{not json", routes)
    assert bl.lag == 4 and bl.scale == 1.0
    assert bl.pending("camera") == (1, 100) and bl.pending("lidar") == (2, 7)
    big = Backlog("t", highwater={0: 40}, committed={0: None})
    big.count(put_event(SRC, "lidar/x", seq="01", size=5)[1], routes)
    big.count(put_event(SRC, "lidar/y", seq="02", size=5)[1], routes)
    assert big.scale == 20 and big.pending("lidar") == (40, 200)


# -- against the real stack ---------------------------------------------------------------------
def test_snapshot_rows_match_catalog_after_mirror_run(xcfg: XdcConfig, tag: str) -> None:
    topic = xcfg.dc("A").kafka.topics.events
    t0 = time.time()
    lidar = [put_event(SRC, f"lidar/{tag}/{i}.bin", seq=new_sequencer(), size=1000 + i, t=t0 - 5 - i)
             for i in range(30)]
    produce(xcfg, "A", topic, lidar)
    _mirror(xcfg)
    # the group's offsets as the broker reports them agree with what the mirror recorded
    group = f"{xcfg.mirror.group_id}.B"
    cat = SqliteCatalog(xcfg.catalog_path("B"))
    assert committed_offsets(xcfg.brokers("A"), group, topic) == \
        {p: o for (t, p), o in cat.offsets(group).items() if t == topic}
    # a backlog the mirror has not seen yet: 12 lidar puts (metadata mode, sizes known)
    later = [put_event(SRC, f"lidar/{tag}/late{i}.bin", seq=new_sequencer(), size=500) for i in range(12)]
    produce(xcfg, "A", topic, later)

    metrics = Metrics(new_registry())
    rows = {r["route"]: r for r in record_lag_snapshot(xcfg, "B", metrics=metrics)}
    assert set(rows) == {r.name for r in xcfg.routes_into("B")}

    truth = cat.lags(time.time() - xcfg.lag.window_seconds, "lidar")
    lid = rows["lidar"]
    assert lid["events"] == len(truth) == 30
    assert lid["p50"] == percentile(truth, 50) and lid["p99"] == percentile(truth, 99)
    assert lid["max"] == max(truth) and lid["max"] >= 5 + 29  # event times were 5..34 s ago
    assert lid["consumer_lag"] == 12
    assert (lid["pending_objects"], lid["pending_bytes"], lid["pending_estimated"]) == (12, 6000, False)
    assert rows["camera"]["events"] == 0 and rows["camera"]["pending_objects"] == 0
    assert rows["camera"]["consumer_lag"] == 12  # same source topic as lidar

    stored = cat.latest_lag_snapshot()
    assert {r["route"]: (r["events"], r["pending_objects"], r["consumer_lag"]) for r in stored} == \
        {n: (r["events"], r["pending_objects"], r["consumer_lag"]) for n, r in rows.items()}
    assert _gauge(metrics, "xdc_objects_pending", route="lidar") == 12
    assert _gauge(metrics, "xdc_bytes_pending", route="lidar") == 6000
    per_part = [_gauge(metrics, "xdc_consumer_lag_messages", group=group, topic=topic, partition=str(p))
                for p in range(xcfg.dc("A").kafka.partitions)]
    assert sum(v or 0 for v in per_part) == 12

    _mirror(xcfg)  # caught up: no backlog, 42 events in the window
    rows = {r["route"]: r for r in record_lag_snapshot(xcfg, "B", metrics=metrics)}
    assert rows["lidar"]["events"] == 42 and rows["lidar"]["consumer_lag"] == 0
    assert rows["lidar"]["pending_objects"] == 0 and rows["lidar"]["pending_bytes"] == 0
    assert len(cat.lag_history(0)) == 2 * len(rows)


def test_prewarm_progress_upsert_keeps_check_result(xcfg: XdcConfig) -> None:
    record_prewarm_progress(xcfg, "B", "ds1", files_done=1, files_total=4, bytes_done=10, bytes_total=40,
                            eta_s=float("inf"))
    record_prewarm_progress(xcfg, "B", "ds1", files_done=4, files_total=4, bytes_done=40, bytes_total=40,
                            eta_s=0, cached_ratio=1.0, ready=True)
    record_prewarm_progress(xcfg, "B", "ds1", files_done=4, files_total=4, bytes_done=40, bytes_total=40, eta_s=0)
    (row,) = prewarm_progress(xcfg.catalog_path("B"))
    assert (row["files_done"], row["eta_s"], row["cached_ratio"], row["ready"]) == (4, 0, 1.0, 1)
    assert prewarm_progress(xcfg.catalog_path("A")) == []
