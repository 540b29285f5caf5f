"""Lag snapshots: per route into a datacenter, how late and how far behind the mirror is.

One snapshot row per route holds the event-time -> applied-time lag of the events applied in the
last ``lag.window_seconds`` (p50/p99/max, from the catalog), the mirror group's Kafka consumer lag
on the route's source topic, and the backlog (objects and bytes changed in the source and not yet
applied). Rows go to the catalog's ``lag_snapshots`` table (kept ``lag.retention_hours``), which
the dashboard draws, and to the Prometheus gauges.

The backlog is read, not guessed: the pending messages (committed offset -> log end) are fetched
with a group-less consumer and routed like the mirror routes them, so objects and bytes per route
are counted from the events themselves (bytes = the ``size`` of put events; deletes count 0). When
the backlog is larger than ``sample_limit`` messages only the first ``sample_limit`` are read and
the per-route counts are scaled by ``consumer_lag / sampled`` (the row's ``pending_estimated``).

Also here: the prewarm progress table the dashboard's prewarm panel reads (``prewarm_progress``,
in the datacenter's catalog file beside cache_client's ``prewarm_`` tables).
"""
from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from mirror.apply import route_event
from mirror.catalog import SqliteCatalog
from mirror.events import ObjectEvent, parse_message
from xdc.config import Brokers, Route, XdcConfig
from xdc.errors import EventError
from xdc.kafka import client_kwargs, group_offsets, kafka_errors, to_records
from xdc.metrics import METRICS, Metrics
from xdc.sqlite import short_connection
from xdc.stats import percentile

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
def mirror_group(cfg: XdcConfig, dc: str) -> str:
    """The mirror's consumer group in dc (the same default as mirror.runner.Mirror)."""
    return f"{cfg.mirror.group_id}.{dc}"


def committed_offsets(brokers: Brokers | Sequence[str], group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on topic, via the admin OffsetFetch API."""
    return {tp.partition: off for tp, off in group_offsets(brokers, group).items() if tp.topic == topic}


def read_backlog(brokers: Brokers | Sequence[str], group: str, topic: str, routes: Sequence[Route], *,
                 committed: dict[int, int] | None = None, sample_limit: int = SAMPLE_LIMIT,
                 timeout_s: float = 10.0, max_key_bytes: int = 1024) -> Backlog:
    """Log end per partition and the pending messages counted per route.

    A group-less consumer is assigned every partition at the committed offset (earliest when the
    group never committed) and reads up to the log end (``end_offsets`` when it starts): that is
    the backlog.
    """
    if committed is None:
        committed = committed_offsets(brokers, group, topic)
    bl = Backlog(topic)
    c = KafkaConsumer(**client_kwargs(brokers), group_id=None, enable_auto_commit=False,
                      auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
                      request_timeout_ms=15_000)
    try:
        with kafka_errors(f"read backlog of {topic}"):
            parts = sorted(c.partitions_for_topic(topic) or ())
            tps = [TopicPartition(topic, p) for p in parts]
            if not tps:
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
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                # reading stops at the log end seen at the start: later messages are not this backlog
                if bl.sampled >= sample_limit or all(c.position(tp) >= bl.highwater.get(tp.partition, 0) for tp in tps):
                    break
                polled = c.poll(timeout_ms=300, max_records=2000)
                for rec in to_records(polled):
                    if bl.sampled >= sample_limit or rec.offset >= bl.highwater.get(rec.partition, 0):
                        continue
                    bl.count(rec.value, routes, max_key_bytes)
            else:
                log.warning("backlog of %s: not read to the end after %.0fs (%d messages sampled)", topic,
                            timeout_s, bl.sampled)
    finally:
        c.close()
    return bl


# -- the snapshot ------------------------------------------------------------------------------
def record_lag_snapshot(cfg: XdcConfig, dc: str, *, metrics: Metrics | None = None,
                        now: float | None = None, sample_limit: int = SAMPLE_LIMIT,
                        group: str | None = None) -> list[dict[str, Any]]:
    """Measure every route into dc, store the rows in dc's catalog, set the gauges, return the rows.

    Row keys: route, events, p50, p99, max (seconds, None with no events in the window),
    consumer_lag (messages on the route's source topic; routes sharing a topic share it),
    pending_objects, pending_bytes, pending_estimated (True when scaled from a sample).
    """
    m = metrics or METRICS
    now = time.time() if now is None else now
    group = group or mirror_group(cfg, dc)
    routes = cfg.routes_into(dc)
    catalog = SqliteCatalog(cfg.catalog_path(dc))
    try:
        backlogs: dict[str, Backlog] = {}
        for src in sorted({r.source.dc for r in routes}):
            topic = cfg.dc(src).kafka.topics.events
            boot = cfg.with_local_dc(dc).brokers(src)
            try:
                committed = committed_offsets(boot, group, topic)
            except Exception as exc:  # noqa: BLE001 - the catalog's offsets are a fine fallback
                log.warning("committed offsets of %s from the broker failed (%s); using the catalog's", group, exc)
                committed = {p: o for (t, p), o in catalog.offsets(group).items() if t == topic}
            backlogs[src] = read_backlog(boot, group, topic, [r for r in routes if r.source.dc == src],
                                         committed=committed, sample_limit=sample_limit,
                                         max_key_bytes=cfg.mirror.max_key_bytes)
        rows: list[dict[str, Any]] = []
        for r in routes:
            bl = backlogs[r.source.dc]
            objs, nbytes = bl.pending(r.name)
            rows.append({"route": r.name, **lag_stats(catalog.lags(now - cfg.lag.window_seconds, r.name)),
                         "consumer_lag": bl.lag, "pending_objects": objs, "pending_bytes": nbytes,
                         "pending_estimated": bl.scale > 1.0})
        catalog.record_lag_snapshot([{k: v for k, v in row.items() if k != "pending_estimated"} for row in rows],
                                    cfg.lag.retention_hours * 3600)
    finally:
        catalog.close()
    for bl in backlogs.values():
        for p, hw in bl.highwater.items():
            m.set_consumer_lag(group, bl.topic, p, hw, bl.committed.get(p))
    for row in rows:
        m.objects_pending.labels(row["route"]).set(row["pending_objects"])
        m.bytes_pending.labels(row["route"]).set(row["pending_bytes"])
    return rows


# -- prewarm progress (read by the dashboard) -------------------------------------------------
_PREWARM_SCHEMA = """
CREATE TABLE IF NOT EXISTS prewarm_progress (
    dataset TEXT NOT NULL, dc TEXT NOT NULL,
    files_done INTEGER NOT NULL, files_total INTEGER NOT NULL,
    bytes_done INTEGER NOT NULL, bytes_total INTEGER NOT NULL,
    eta_s REAL,                   -- NULL: not estimable yet
    cached_ratio REAL,            -- NULL until a check ran
    ready INTEGER,                -- 1 mirrored and warm, 0 not (yet), NULL unknown
    updated REAL NOT NULL,
    PRIMARY KEY (dataset, dc)
);
"""


_db = short_connection  # the catalog file is shared with the mirror and prewarm processes


def record_prewarm_progress(cfg: XdcConfig, dc: str, dataset: str, *, files_done: int, files_total: int,
                            bytes_done: int, bytes_total: int, eta_s: float | None,
                            cached_ratio: float | None = None, ready: bool | None = None,
                            now: float | None = None) -> None:
    """Upsert one dataset's prewarm progress in dc (what the dashboard's prewarm panel shows).

    A later call without cached_ratio/ready keeps the values an earlier call stored.
    """
    eta = None if eta_s is None or math.isinf(eta_s) or math.isnan(eta_s) else max(0.0, eta_s)
    with _db(cfg.catalog_path(dc)) as db:
        db.executescript(_PREWARM_SCHEMA)
        db.execute(
            "INSERT INTO prewarm_progress VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(dataset, dc) DO UPDATE SET "
            "files_done=excluded.files_done, files_total=excluded.files_total, bytes_done=excluded.bytes_done, "
            "bytes_total=excluded.bytes_total, eta_s=excluded.eta_s, "
            "cached_ratio=COALESCE(excluded.cached_ratio, cached_ratio), ready=COALESCE(excluded.ready, ready), "
            "updated=excluded.updated",
            (dataset, dc, files_done, files_total, bytes_done, bytes_total, eta, cached_ratio,
             None if ready is None else int(ready), time.time() if now is None else now))


def prewarm_progress_callback(cfg: XdcConfig, dc: str, dataset: str, *, every_s: float = 2.0
                              ) -> Callable[[Any], None]:
    """A cache_client.progress.Progress callback that stores snapshots, at most one per every_s
    (and always the last one, when files_done reaches files_total)."""
    last = [0.0]

    def cb(snap: Any) -> None:
        t = time.monotonic()
        final = snap.files_total and snap.files_done >= snap.files_total
        if not final and t - last[0] < every_s:
            return
        last[0] = t
        record_prewarm_progress(cfg, dc, dataset, files_done=snap.files_done, files_total=snap.files_total,
                                bytes_done=snap.bytes_done, bytes_total=snap.bytes_total,
                                eta_s=0.0 if final else snap.eta_seconds)
    return cb


def prewarm_progress(path: Path) -> list[dict[str, Any]]:
    """Every prewarm_progress row of a catalog file ([] when none was ever recorded)."""
    if not path.exists():
        return []
    with _db(path) as db:
        db.row_factory = sqlite3.Row
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name='prewarm_progress'").fetchone():
            return []
        return [dict(r) for r in db.execute("SELECT * FROM prewarm_progress ORDER BY dataset, dc")]
