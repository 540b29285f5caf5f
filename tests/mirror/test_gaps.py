"""Offset gaps on the real stack: the topic's retention deletes events the mirror never consumed
(mirror stopped meanwhile); the mirror reports the gap before consuming and its verify with repair
brings the target back to the source. The target is compared with the source by listing both
buckets and reading the bytes back, not through the mirror's state.

Retention, not DeleteRecords: the test topic gets retention.ms=1000 / segment.ms=200 through the
admin client, and the stack's broker applies retention every second (devtools/kafka_broker.py:
`log.retention.check.interval.ms`); Kafka then deletes the old segments (the active one rolled
first) and moves the log start offset, as it does after days in production.
"""
from __future__ import annotations

import time

import pytest
from kafka.admin import ConfigResource, ConfigResourceType

from mirror.runner import Mirror
from tests.mirror.chaos_support import variant
from tests.support import brokers, silent_store, site, topo
from xdc.config import XdcConfig
from xdc.io.kafka import TopicPartition, group_offsets, make_admin, make_consumer
from xdc.io.state import Gap
from xdc.metrics import Metrics, new_registry
from xdc.observe.dashboard import dc_state

pytestmark = pytest.mark.both_backends

SRC, DST = "idca-drive", "idcb-drive"


def _narrow(cfg: XdcConfig, tag: str) -> XdcConfig:
    """The routes narrowed to this test's prefix (the buckets are shared by every test)."""
    routes = [r.model_dump() for r in cfg.routes]
    for r in routes:
        r["source"]["prefix"] += f"{tag}/"
        r["target"]["prefix"] += f"{tag}/"
    return variant(cfg, {"routes": routes})


def _set_retention(cfg: XdcConfig, topic: str, configs: dict[str, str]) -> None:
    admin = make_admin(brokers(cfg, "A"))
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        admin.close()


def _log_bounds(cfg: XdcConfig, topic: str, partitions: int) -> tuple[dict[int, int], dict[int, int]]:
    c = make_consumer(brokers(cfg, "A"), None)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        starts, ends = c.beginning_offsets(tps), c.end_offsets(tps)
        return {tp.partition: o for tp, o in starts.items()}, {tp.partition: o for tp, o in ends.items()}
    finally:
        c.close()


def _listing(cfg: XdcConfig, dc: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under the prefix, read back (through the gateway itself, not the state)."""
    s = silent_store(cfg, dc)
    return {o.key[len(prefix):]: s.get(bucket, o.key) for o in s.list(bucket, prefix)}


def test_events_deleted_by_retention_unseen_are_reported_and_repaired(xcfg: XdcConfig, tag: str) -> None:
    cfg = _narrow(xcfg, tag)
    route = next(r for r in cfg.routes if r.name == "camera")
    events = site(cfg, "A").topics.events
    nparts = cfg.dc("A").kafka.partitions
    src = site(cfg, "A").store
    early = [f"{route.source.prefix}e{i}.bin" for i in range(3)]
    for k in early:
        src.put(SRC, k, b"early " + k.encode())
    metrics = Metrics(new_registry())
    with Mirror(topo(cfg, "B"), metrics=metrics) as m:
        assert m.run(once=True).applied == 3
        group = m.group_id
    before = {tp.partition: o for tp, o in group_offsets(brokers(cfg, "A"), group).items() if tp.topic == events}
    assert before  # the group has committed offsets: the gap is "committed < log start"

    # the mirror is stopped; the topic keeps its events one second; meanwhile the source changes
    _set_retention(cfg, events, {"retention.ms": "1000", "segment.ms": "200"})
    late = [f"{route.source.prefix}l{i:02d}.bin" for i in range(10)]
    for k in late:
        src.put(SRC, k, b"late " + k.encode() * 20)
    src.put(SRC, early[0], b"changed while the mirror was away")
    src.delete(SRC, early[1])
    _, written = _log_bounds(cfg, events, nparts)
    deadline = time.monotonic() + 90
    while True:  # the broker's retention (checked every second) moves each log start to its end
        starts, _ = _log_bounds(cfg, events, nparts)
        if all(starts[p] >= written[p] for p in range(nparts)):
            break
        assert time.monotonic() < deadline, f"retention did not delete the events: starts {starts}, ends {written}"
        time.sleep(0.5)
    # before the mirror runs again, the topic keeps events as usual (the repair's go through it too)
    _set_retention(cfg, events, {"retention.ms": str(7 * 86400 * 1000), "segment.ms": str(7 * 86400 * 1000)})
    expected = {p: (before.get(p), starts[p], starts[p] - before.get(p, 0))
                for p in range(nparts) if starts[p] > before.get(p, 0)}
    assert expected, "no partition lost events: the test proves nothing"

    metrics = Metrics(new_registry())
    with Mirror(topo(cfg, "B"), metrics=metrics) as m:
        m.run(once=True)
        found = {(g.partition, g.committed, g.log_start, g.lost) for g in m.loop.gaps}
    assert found == {(p, c, s, lost) for p, (c, s, lost) in expected.items()}

    # the gaps are recorded (the dashboard's panel), counted, and repaired
    rows = site(cfg, "B").state.incidents.recent("gaps")
    assert {(r["part"], r["committed"], r["log_start"], r["lost"]) for r in rows} == found
    assert all(r["grp"] == group and r["topic"] == events and r["status"] == "repaired" for r in rows)
    assert all(set(r["routes"].split(",")) == {x.name for x in cfg.routes if x.source.dc == "A"} for r in rows)
    assert all("camera: 10 missing, 1 extra, 1 differ" in r["repair"] for r in rows), rows[0]["repair"]
    shown = dc_state(site(cfg, "B"), time.time())["gaps"]  # what the dashboard's gaps panel lists
    assert [(g["part"], g["status"]) for g in shown] == [(r["part"], "repaired") for r in rows]
    assert metrics.registry.get_sample_value("xdc_event_gaps_total", {"topic": events}) == len(expected)
    assert metrics.registry.get_sample_value("xdc_event_gap_lost_offsets_total", {"topic": events}) == \
        sum(lost for _, _, lost in expected.values())

    # the target is the source again: same keys, same bytes (the early[1] delete included)
    want = _listing(cfg, "A", SRC, route.source.prefix)
    assert len(want) == 12 and early[1][len(route.source.prefix):] not in want
    assert _listing(cfg, "B", DST, route.target.prefix) == want
    # acknowledged: the group now starts at the log start, a restart finds no gap again
    after = {tp.partition: o for tp, o in group_offsets(brokers(cfg, "A"), group).items() if tp.topic == events}
    assert all(after[p] >= s for p, (_, s, _) in expected.items())
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
        m.run(once=True)
        assert m.loop.gaps == []
    assert len(site(cfg, "B").state.incidents.recent("gaps")) == len(expected)


def test_a_gap_recorded_but_not_repaired_is_driven_again_at_start(xcfg: XdcConfig, tag: str) -> None:
    """A process that died after recording a gap (and acknowledging it in the group) before its
    repair finished: the next start finds the pending row and repairs the routes."""
    cfg = _narrow(xcfg, tag)
    route = next(r for r in cfg.routes if r.name == "camera")
    keys = [f"{route.source.prefix}k{i}.bin" for i in range(4)]
    quiet = silent_store(cfg, "A")
    for k in keys:  # their events are the ones the gap lost: none reaches the topic
        quiet.put(SRC, k, k.encode() * 30)
    state = site(cfg, "B").state
    group = Mirror(topo(cfg, "B"), metrics=Metrics(new_registry()))
    gid = group.group_id
    group.close()
    events = site(cfg, "A").topics.events
    assert state.incidents.record_gap(Gap(gid, events, 0, 5, 9, 4, ("camera",), "verify --repair pending"))
    # the same gap found again (acknowledgement lost) is not recorded twice
    assert not state.incidents.record_gap(Gap(gid, events, 0, 5, 9, 4, ("camera",), "verify --repair pending"))
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
        m.run(once=True)
    rows = state.incidents.recent("gaps")
    assert [(r["status"], r["repair"]) for r in rows] == [
        ("repaired", "verify --repair: camera: 4 missing, 0 extra, 0 differ, 4 repairs published")]
    assert state.incidents.open_gaps(gid) == []
    assert _listing(cfg, "B", DST, route.target.prefix) == _listing(cfg, "A", SRC, route.source.prefix)
    assert len(_listing(cfg, "B", DST, route.target.prefix)) == 4
