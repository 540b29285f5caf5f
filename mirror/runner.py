"""The mirror: a consume-loop handler that applies change events to this datacenter.

    event -> validate -> route -> decide -> copy -> state -> applied event -> commit

Per batch: parse and validate each message (a bad one becomes a dead letter with its reason) ->
route each object event to the route that covers it -> collapse to the newest event per key and
decide against the state (stale and duplicate events are dropped) -> copy or delete object data on
data routes -> one state transaction with the entries, the applied events owed (outbox) and the
consumed offsets -> publish the outbox -> the loop commits the Kafka offsets.

At-least-once delivery with idempotent apply: a batch delivered again finds its sequencers in the
state and is ignored; the outbox guarantees the applied events of a committed batch go out even
when the process dies between the state commit and the publish.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer

from mirror.apply import collapse, decide, entry_for
from xdc.routing import Routed, route_event
from xdc.errors import EventError, ObjectNotFound, StoreError, SupersededError, UnavailableError, XdcError
from xdc.events import AppliedEvent, ObjectEvent, encode_applied, parse_message
from xdc.faults import crash_point
from xdc.io.consume import Batch, ConsumeLoop, Letter, Prepared, Source
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import Record, consumer_lag
from xdc.io.outbox import OutboxPublisher
from xdc.io.state import CatalogEntry, Outgoing
from xdc.io.store import META_SOURCE_SEQUENCER
from xdc.metrics import METRICS, Metrics, observe_many
from xdc.stats import Reservoir
from xdc.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class MirrorStats:
    batches: int = 0
    records: int = 0
    applied: int = 0
    ignored: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    bytes_copied: int = 0
    lags: Reservoir = field(default_factory=Reservoir)  # bounded: a --follow process runs for months
    seconds: float = 0.0
    busy_seconds: float = 0.0  # time spent applying batches (not waiting for events)

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "records": self.records, "applied": self.applied,
                "ignored": dict(self.ignored), "dead_letters": self.dead_letters,
                "bytes_copied": self.bytes_copied, "seconds": round(self.seconds, 3),
                "busy_seconds": round(self.busy_seconds, 3),
                "lag_p50_s": self.lags.percentile(50), "lag_p99_s": self.lags.percentile(99),
                "lag_max_s": self.lags.max}


class TargetUnavailable(XdcError):
    """Some copies found an endpoint unreachable: the batch waits for it (nothing is dead-lettered)."""

    retriable = True


class Mirror:
    """Mirrors every route into `topology.here` from each source datacenter."""

    def __init__(self, topology: Topology, *, metrics: Metrics | None = None, group_id: str | None = None) -> None:
        self.topology = topology
        self.site = topology.here
        self.dc = self.site.name
        self.routes = self.site.routes_in
        self.settings = topology.config.mirror
        self.metrics = metrics or METRICS
        for r in self.routes:  # zero series: increase() sees the first event of each route
            self.metrics.init_route(r.name)
        self.group_id = group_id or self.site.group("mirror")
        self.catalog = self.site.state.catalog
        self.target = self.site.store
        self.producer = self.site.producer
        self.applied_topic = self.site.topics.applied
        self.stats = MirrorStats()
        self._stats_lock = threading.Lock()  # the loop's two threads both count
        # applied events leave through the outbox: exactly once, in order per source partition
        self.outbox = OutboxPublisher(self.catalog, self.producer, lambda: self.site.consumer(None), name="mirror",
                                      tag=f"{self.dc}:")
        self._pool = ThreadPoolExecutor(self.settings.copy_concurrency, thread_name_prefix="copy")
        self._consumers: dict[str, KafkaConsumer] = {}
        self._lag_observed_at = 0.0
        sources = []
        for src in sorted({r.source.dc for r in self.routes}):
            site = topology.site(src)
            self._consumers[src] = site.consumer(self.group_id)
            sources.append(Source(src, self._consumers[src], self.group_id, (site.topics.events,)))
        self.loop = ConsumeLoop(
            sources, self, name="mirror", max_records=self.settings.batch_max_records,
            poll_timeout_s=self.settings.batch_max_seconds,
            dead_letters=DeadLetterSink(self.producer, self.site.topics.dead_letter,
                                        incidents=self.site.state.incidents, on_letter=self._count_dead_letter))

    @property
    def alive(self) -> bool:
        return self.loop.alive

    @property
    def caught_up(self) -> bool:
        return self.loop.caught_up

    def close(self) -> None:
        self.loop.close()
        self.outbox.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count_dead_letter(self, topic: str, reason: str) -> None:
        self.metrics.dead_letters_total.labels(topic=topic, reason=reason).inc()

    def run(self, *, once: bool = False, max_seconds: float | None = None,
            stop: threading.Event | None = None, join_timeout_s: float = 60.0) -> MirrorStats:
        """Apply events until stopped (`once`: until every assigned partition is at its end).
        On a state that takes one mirror process (SQLite), a second one is refused (ReplicaRefused)."""
        with self.site.state.lease("mirror"):
            self.flush_outbox()  # what a previous process committed but did not publish
            ls = self.loop.run(once=once, max_seconds=max_seconds, stop=stop, join_timeout_s=join_timeout_s)
        st = self.stats
        st.batches, st.records, st.dead_letters = ls.batches, ls.records, ls.dead_letters
        st.seconds, st.busy_seconds = ls.seconds, ls.busy_seconds
        return st

    # -- the consume-loop handler ----------------------------------------------------------------
    def handle(self, batch: Batch) -> list[Letter]:
        prepared = self.prepare(batch)
        prepared.durable()
        return prepared.letters

    def prepare(self, batch: Batch) -> Prepared:
        """validate -> route -> decide -> copy here; the returned `durable` part does the state
        transaction and the outbox (the loop runs it on its writer thread, in batch order, while
        it prepares the next batch)."""
        letters: list[Letter] = []
        ignored: Counter[tuple[str, str]] = Counter()  # (route, reason): metrics once per batch
        plain: Counter[str] = Counter()  # reasons without a route
        routed = self._validate_and_route(batch, letters, plain)
        items = collapse(routed)  # decide
        plain["superseded_in_batch"] += len(routed) - len(items)
        # Data routes are decided against the state before copying (no copy of a stale event);
        # metadata routes are decided by the upsert's own guard (one round trip less per batch).
        data = [it for it in items if it.route.mode != "metadata"]
        current = self.catalog.get_many((it.target_bucket, it.target_key) for it in data) if data else {}
        todo: list[Routed] = [it for it in items if it.route.mode == "metadata"]
        for it in data:
            d = decide(it, current.get((it.target_bucket, it.target_key)))
            if d == "apply":
                todo.append(it)
            else:
                ignored[(it.route.name, d)] += 1

        done, unavailable = self._copy(todo, letters, plain)  # copy / delete where the route says data
        crash_point("mirror.after_copy")
        offsets: dict[tuple[str, str, int], int] = {}
        if not unavailable:  # a batch that waits for an endpoint records no offsets yet
            for rec in batch.records:
                k = (self.group_id, rec.topic, rec.partition)
                if rec.offset >= offsets.get(k, 0):
                    offsets[k] = rec.offset + 1
        entries = [e for _, e in done]
        routed_of = {id(e): it for it, e in done}
        announced = _applied_messages(self.applied_topic, done)  # usually every entry is applied

        def outbox(ok: list[CatalogEntry]) -> list[Outgoing]:
            if len(ok) == len(entries):
                return announced
            return _applied_messages(self.applied_topic, [(routed_of[id(e)], e) for e in ok])

        def durable() -> None:
            applied = self.catalog.commit_batch(entries, outbox, offsets)  # entries + outbox + offsets: one transaction
            crash_point("mirror.after_state_commit")
            self.flush_outbox()
            crash_point("mirror.after_applied_publish")
            refused: Counter[tuple[str, str]] = Counter()
            if len(applied) < len(entries):  # the guard kept newer or equal rows: say which
                self._classify_refused(entries, applied, refused)
            self._observe_applied(applied)
            self._count_ignored(refused)
            if unavailable:
                it, exc = unavailable[0]
                raise TargetUnavailable(f"{len(unavailable)} copies could not reach their endpoint, "
                                        f"e.g. {it.event.bucket}/{it.event.key}: {exc}")

        self._count_ignored(ignored, plain)
        self._observe_consumer_lag(batch.source)  # the source's consumer: this thread only
        return Prepared(letters, durable)

    def _classify_refused(self, tried: list[CatalogEntry], applied: list[CatalogEntry],
                          ignored: Counter[tuple[str, str]]) -> None:
        """Entries the state refused are duplicates (it holds their sequencer) or stale (newer)."""
        ok = {(e.bucket, e.key) for e in applied}
        refused = [e for e in tried if (e.bucket, e.key) not in ok]
        now = self.catalog.get_many((e.bucket, e.key) for e in refused)
        for e in refused:
            cur = now.get((e.bucket, e.key))
            ignored[(e.route, "duplicate" if cur is not None and cur.sequencer == e.sequencer else "stale")] += 1

    def _count_ignored(self, ignored: Counter[tuple[str, str]], plain: Counter[str] | None = None) -> None:
        """Ignored events into the stats and metrics (from both of the loop's threads)."""
        with self._stats_lock:
            for (route, reason), n in ignored.items():
                self.stats.ignored[reason] += n
                self.metrics.events_ignored_total.labels(route=route, reason=reason).inc(n)
            for reason, n in (plain or {}).items():
                if n:
                    self.stats.ignored[reason] += n

    def on_revoked(self, source: str, partitions: list[Any]) -> None:
        self.flush_outbox()  # before another replica takes the partitions

    def on_assigned(self, source: str, partitions: list[Any], consumer: KafkaConsumer) -> None:
        log.info("mirror into %s: assigned %s of %s", self.dc,
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)), source)

    def _validate_and_route(self, batch: Batch, letters: list[Letter], ignored: Counter[str]) -> list[Routed]:
        m = self.settings
        routes = [r for r in self.routes if r.source.dc == batch.source]
        max_bytes, max_key = m.max_message_bytes, m.max_key_bytes
        routed: list[Routed] = []
        not_object = unrouted = 0
        for rec in batch.records:
            try:
                events = parse_message(rec.value, max_bytes=max_bytes, max_key_bytes=max_key)
                if len(events) == 1:  # the usual notification: one record, no list to build
                    ev = events[0]
                    if not isinstance(ev, ObjectEvent):
                        not_object += 1
                        continue
                    it = route_event(ev, routes, rec, max_key)
                    if it is None:
                        unrouted += 1
                    else:
                        routed.append(it)
                    continue
                mine = []
                for ev in events:
                    if not isinstance(ev, ObjectEvent):
                        not_object += 1
                        continue
                    it = route_event(ev, routes, rec, max_key)
                    if it is None:
                        unrouted += 1
                    else:
                        mine.append(it)
            except EventError as exc:  # a message with one bad record is dead-lettered whole
                log.warning("dead letter %s[%d]@%d: %s %s", rec.topic, rec.partition, rec.offset, exc.reason,
                            exc.detail[:200])
                letters.append(Letter(rec, exc.reason, exc.detail))
                continue
            routed.extend(mine)
        ignored["not_object_event"] += not_object
        ignored["unrouted"] += unrouted
        return routed

    def _copy(self, todo: list[Routed], letters: list[Letter], ignored: Counter[str]
              ) -> tuple[list[tuple[Routed, CatalogEntry]], list[tuple[Routed, StoreError]]]:
        """Copy or delete object data for data routes (metadata routes pass through). Returns the
        entries to record and the items whose endpoint was unreachable."""
        entries: list[tuple[Routed, CatalogEntry]] = []
        futures = []
        now = time.time()  # one applied time per batch of metadata: the state commit follows at once
        for it in todo:
            if it.route.mode == "metadata":
                entries.append((it, entry_for(it, applied_time=now)))
            else:
                futures.append((it, self._pool.submit(self._delete if it.event.op == "delete" else self._copy_one, it)))
        unavailable: list[tuple[Routed, StoreError]] = []
        copied: Counter[str] = Counter()
        for it, fut in futures:
            try:
                size, etag = fut.result()
            except SupersededError as exc:
                ignored["superseded"] += 1
                log.info("%s", exc)
                continue
            except UnavailableError as exc:
                unavailable.append((it, exc))
                continue
            except StoreError as exc:  # permanent, or still failing after the copy's retries
                reason = "copy_failed_after_retries" if exc.retriable else "copy_failed"
                letters.append(Letter(it.record, reason, f"{it.event.bucket}/{it.event.key}: {exc}"))
                self.metrics.events_failed_total.labels(route=it.route.name, reason=reason).inc()
                continue
            entries.append((it, entry_for(it, applied_time=time.time(), size=size, etag=etag)))
            if it.event.op == "put":
                copied[it.route.name] += size
        for route, n in copied.items():
            with self._stats_lock:
                self.stats.bytes_copied += n
            self.metrics.bytes_copied_total.labels(route=route).inc(n)
        return entries, unavailable

    def _copy_one(self, it: Routed) -> tuple[int, str]:
        src = self.topology.site(it.route.source.dc).store
        meta = {META_SOURCE_SEQUENCER: it.event.sequencer.rstrip("0") or "0"}
        try:
            landed = src.copy_to(self.target, it.event.bucket, it.event.key, it.target_bucket, it.target_key,
                                 expect_etag=it.event.etag or None, metadata=meta)
        except ObjectNotFound as exc:
            raise SupersededError(f"{it.event.bucket}/{it.event.key} is gone from the source") from exc
        return landed.size, landed.etag

    def _delete(self, it: Routed) -> tuple[int, str]:
        try:
            self.target.delete(it.target_bucket, it.target_key)
        except ObjectNotFound:
            pass  # already gone: deletes are idempotent
        return 0, ""

    def flush_outbox(self) -> int:
        """Publish the applied events the state owes: each once, in order per source partition,
        also when several replicas flush at the same time (xdc/io/outbox.py)."""
        return self.outbox.flush()

    # -- metrics -----------------------------------------------------------------------------
    def _observe_applied(self, entries: list[CatalogEntry]) -> None:
        """Lag histogram and counters: one label lookup and one bulk observe per route and batch."""
        by_route: dict[tuple[str, str], list[CatalogEntry]] = {}
        for e in entries:
            by_route.setdefault((e.route, e.source_dc), []).append(e)
        m = self.metrics
        with self._stats_lock:
            self.stats.applied += len(entries)
        for (route, src), es in by_route.items():
            lags = [max(0.0, e.applied_time - e.event_time) for e in es]  # clock skew counts as 0
            with self._stats_lock:
                self.stats.lags.extend(lags)
            observe_many(m.replication_lag_seconds.labels(route, src, self.dc), lags)
            deletes = sum(1 for e in es if e.deleted)
            if deletes:
                m.events_applied_total.labels(route, "delete").inc(deletes)
            if len(es) - deletes:
                m.events_applied_total.labels(route, "put").inc(len(es) - deletes)
            m.last_apply_timestamp_seconds.labels(route).set(max(e.applied_time for e in es))

    def _observe_consumer_lag(self, source: str) -> None:
        # committed() is a broker round trip per partition: once every few seconds is plenty
        now = time.monotonic()
        if now - self._lag_observed_at < 5.0:
            return
        self._lag_observed_at = now
        for tp, lag in consumer_lag(self._consumers[source]).items():
            self.metrics.consumer_lag_messages.labels(self.group_id, tp.topic, str(tp.partition)).set(lag)


def _applied_messages(topic: str, done: list[tuple[Routed, CatalogEntry]]) -> list[Outgoing]:
    """One applied message per source partition per batch, holding that partition's objects in order.

    Keyed by the source partition, so one object's applied events always share a partition and stay
    in order; batching cut the publish cost per object by the batch size.
    """
    by_part: dict[int, list[AppliedEvent]] = {}
    for it, e in done:
        by_part.setdefault(it.record.partition, []).append(AppliedEvent(
            e.route, "delete" if e.deleted else "put", e.bucket, e.key, e.size, e.etag, e.sequencer, e.event_time,
            e.applied_time, {"dc": e.source_dc, "bucket": e.source_bucket, "key": e.source_key,
                             "etag": e.source_etag}))
    return [Outgoing(topic, f"p{part}".encode(), encode_applied(items)) for part, items in sorted(by_part.items())]


__all__ = ["Mirror", "MirrorStats", "Record"]
