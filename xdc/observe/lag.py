"""Lag snapshots: per route into a datacenter, how late and how far behind the mirror is.

One snapshot row per route holds the event-time -> applied-time lag of the events applied in the
last ``lag.window_seconds`` (p50/p99/max, from the catalog), the mirror group's Kafka consumer lag
on the route's source topic, and the backlog (objects and bytes changed in the source and not yet
applied). Rows go to the state's lag history (kept ``lag.retention_hours``), which
the dashboard draws, and to the Prometheus gauges.

The backlog is read, not guessed: the pending messages (committed offset -> log end) are fetched
with a group-less consumer and routed like the mirror routes them, so objects and bytes per route
are counted from the events themselves (bytes = the ``size`` of put events; deletes count 0). When
the backlog is larger than ``sample_limit`` messages only the first ``sample_limit`` are read and
the per-route counts are scaled by ``consumer_lag / sampled`` (the row's ``pending_estimated``).

"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from xdc.config import Route
from xdc.errors import EventError, KafkaError
from xdc.events import ObjectEvent, parse_message
from xdc.io.consume import Batch, ConsumeLoop, Letter, Source
from xdc.io.kafka import group_offsets, kafka_errors
from xdc.metrics import METRICS, Metrics
from xdc.routing import route_event
from xdc.stats import percentile
from xdc.topology import Site

log = logging.getLogger(__name__)

# Read at most this many pending messages per source topic to count the backlog exactly.
SAMPLE_LIMIT = 20_000


# -- pure logic --------------------------------------------------------------------------------
def lag_stats(lags: Sequence[float]) -> dict[str, Any]:
    """events, p50, p99, max of a window's lags (None when nothing was applied)."""
    return {"events": len(lags), "p50": percentile(lags, 50), "p99": percentile(lags, 99),
            "max": max(lags) if lags else None}


def lag_over_objective(rows: Sequence[dict[str, Any]], objective: float) -> bool:
    """True when any route's p99 lag is above the objective (routes with no events pass)."""
    return any(r.get("p99") is not None and r["p99"] > objective for r in rows)


@dataclass
class Backlog:
    """One source topic's backlog for one consumer group."""

    topic: str
    highwater: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int | None] = field(default_factory=dict)
    sampled: int = 0  # pending messages actually read
    objects: dict[str, int] = field(default_factory=dict)  # route -> pending objects (counted)
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def lag(self) -> int:
        return sum(max(0, hw - (self.committed.get(p) or 0)) for p, hw in self.highwater.items())

    @property
    def scale(self) -> float:
        """Factor from the counted sample to the whole backlog (1 when everything was read)."""
        return 1.0 if self.sampled == 0 or self.sampled >= self.lag else self.lag / self.sampled

    def pending(self, route: str) -> tuple[int, int]:
        s = self.scale
        return round(self.objects.get(route, 0) * s), round(self.bytes.get(route, 0) * s)

    def count(self, value: bytes, routes: Sequence[Route], max_key_bytes: int = 1024) -> None:
        """Route one pending message and add its objects to the route's counts (pure)."""
        self.sampled += 1
        try:
            events = parse_message(value)
        except EventError:
            return  # it will go to the dead-letter topic, not to a route
        for ev in events:
            if not isinstance(ev, ObjectEvent):
                continue
            try:
                it = route_event(ev, routes, None, max_key_bytes)  # type: ignore[arg-type]
            except EventError:
                continue
            if it is not None:
                name = it.route.name
                self.objects[name] = self.objects.get(name, 0) + 1
                self.bytes[name] = self.bytes.get(name, 0) + (ev.size if ev.op == "put" else 0)


# -- Kafka -------------------------------------------------------------------------------------
def committed_offsets(site: Site, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on topic, via the admin OffsetFetch API."""
    return {tp.partition: off for tp, off in group_offsets(site.brokers, group).items() if tp.topic == topic}


class _BacklogCounter:
    """Consume-loop handler of the lag reader: counts pending messages per route, up to the log
    end seen when it started (later messages are not this backlog) or `sample_limit` messages."""

    def __init__(self, backlog: Backlog, routes: Sequence[Route], sample_limit: int, max_key_bytes: int,
                 consumer: KafkaConsumer, tps: list[TopicPartition]) -> None:
        self.backlog, self.routes = backlog, routes
        self.sample_limit, self.max_key_bytes = sample_limit, max_key_bytes
        self.consumer, self.tps = consumer, tps
        self.done = threading.Event()

    def handle(self, batch: Batch) -> Sequence[Letter]:
        bl = self.backlog
        for rec in batch.records:
            if bl.sampled < self.sample_limit and rec.offset < bl.highwater.get(rec.partition, 0):
                bl.count(rec.value, self.routes, self.max_key_bytes)
        if bl.sampled >= self.sample_limit or self.at_end():
            self.done.set()
        return []

    def at_end(self) -> bool:
        return all(self.consumer.position(tp) >= self.backlog.highwater.get(tp.partition, 0) for tp in self.tps)


def read_backlog(site: Site, group: str, topic: str, routes: Sequence[Route], *,
                 committed: dict[int, int] | None = None, sample_limit: int = SAMPLE_LIMIT,
                 timeout_s: float = 10.0, max_key_bytes: int = 1024) -> Backlog:
    """Log end per partition and the pending messages counted per route.

    A group-less consumer is assigned every partition at the committed offset (earliest when the
    group never committed) and reads on the consume loop up to the log end seen when it starts
    (`end_offsets`), or until `sample_limit` messages were counted.
    """
    if committed is None:
        committed = committed_offsets(site, group, topic)
    bl = Backlog(topic)
    c = site.consumer(None, max_partition_fetch_bytes=4 * 1024 * 1024, request_timeout_ms=15_000)
    with kafka_errors(f"assign {topic}"):
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        if not tps:
            c.close()
            return bl
        c.assign(tps)
        bl.highwater = {tp.partition: off for tp, off in c.end_offsets(tps).items()}
        for tp in tps:
            off = committed.get(tp.partition)
            if off is None:
                c.seek_to_beginning(tp)
            else:
                c.seek(tp, off)
            bl.committed[tp.partition] = off
    counter = _BacklogCounter(bl, routes, sample_limit, max_key_bytes, c, tps)
    loop = ConsumeLoop([Source(site.name, c, None)], counter, name="lag", max_records=2000, poll_timeout_s=0.3)
    try:
        if not counter.at_end():
            loop.run(max_seconds=timeout_s, stop=counter.done)
    finally:
        loop.close()
    if not counter.done.is_set() and not counter.at_end():
        log.warning("backlog of %s: not read to the end after %.0fs (%d messages sampled)", topic, timeout_s,
                    bl.sampled)
    return bl


# -- the snapshot ------------------------------------------------------------------------------
def record_lag_snapshot(site: Site, *, metrics: Metrics | None = None, now: float | None = None,
                        sample_limit: int = SAMPLE_LIMIT, group: str | None = None) -> list[dict[str, Any]]:
    """Measure every route into the site, store the rows in its state, set the gauges, return the rows.

    Row keys: route, events, p50, p99, max (seconds, None with no events in the window),
    consumer_lag (messages on the route's source topic; routes sharing a topic share it),
    pending_objects, pending_bytes, pending_estimated (True when scaled from a sample).
    """
    m = metrics or METRICS
    now = time.time() if now is None else now
    group = group or site.group("mirror")
    routes = site.routes_in
    cfg = site.topology.config
    state = site.state
    backlogs: dict[str, Backlog] = {}
    for src_name in sorted({r.source.dc for r in routes}):
        src = site.topology.site(src_name)
        topic = src.topics.events
        try:
            committed = committed_offsets(src, group, topic)
        except KafkaError as exc:  # the state's offsets are a fine fallback
            log.warning("committed offsets of %s from the broker failed (%s); using the state's", group, exc)
            committed = {p: o for (t, p), o in state.catalog.offsets(group).items() if t == topic}
        backlogs[src_name] = read_backlog(src, group, topic, [r for r in routes if r.source.dc == src_name],
                                          committed=committed, sample_limit=sample_limit,
                                          max_key_bytes=cfg.mirror.max_key_bytes)
    rows: list[dict[str, Any]] = []
    for r in routes:
        bl = backlogs[r.source.dc]
        objs, nbytes = bl.pending(r.name)
        rows.append({"route": r.name, **lag_stats(state.catalog.lags(now - cfg.lag.window_seconds, r.name)),
                     "consumer_lag": bl.lag, "pending_objects": objs, "pending_bytes": nbytes,
                     "pending_estimated": bl.scale > 1.0})
    state.lag.record(rows, cfg.lag.retention_hours * 3600, now=now)
    for bl in backlogs.values():
        for p, hw in bl.highwater.items():
            m.set_consumer_lag(group, bl.topic, p, hw, bl.committed.get(p))
    for row in rows:
        m.objects_pending.labels(row["route"]).set(row["pending_objects"])
        m.bytes_pending.labels(row["route"]).set(row["pending_bytes"])
    return rows
