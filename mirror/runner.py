"""The mirror: a consume-loop handler that applies change events to this datacenter.

    event -> validate -> route -> decide -> copy -> state -> applied event -> commit

Per batch: parse and validate each message (a bad one becomes a dead letter with its reason; a
family ignored by design is counted) -> route each object event to the route that covers it ->
group by key: the newest S3 event, a reconciliation, tag / ACL changes (`mirror.apply`) -> decide
against the state (stale and duplicate S3 events are dropped; reconciliations always apply) ->
copy, delete or reconcile object data on data routes -> tags and ACL -> one state transaction with
the entries, the tag / ACL changes, the applied events owed (outbox) and the consumed offsets ->
publish the outbox -> the loop commits the Kafka offsets.

The batch is applied in two parts (`prepare`, `durable`): everything up to the state transaction
(parse, route, decide, copy on the async copy engine, tags and ACL) runs on the consume loop's
thread; the state transaction, the outbox publish and the batch's trace spans run on the loop's
writer thread, in batch order, while the next batch is prepared (xdc/io/consume.py). Several
replicas (one consumer group, PostgreSQL state) share the source partitions; the outbox publisher
(xdc/io/outbox.py) sends each applied event once, whichever replica flushes.

At-least-once delivery with idempotent apply: a batch delivered again finds its sequencers in the
state and is ignored; the outbox guarantees the applied events of a committed batch go out even
when the process dies between the state commit and the publish.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer

from mirror.apply import KeyWork, decide, entry_for, plan_batch
from mirror.gaps import GapHealer
from mirror.tracing import BatchTrace
from mirror.twoway import CalledOff, Version, conflict_key, mark_key, settle_delete, settle_put
from xdc.config import Route
from xdc.errors import EventError, ObjectNotFound, StoreError, SupersededError, UnavailableError, XdcError
from xdc.events import AppliedEvent, IgnoredEvent, ObjectEvent, encode_applied, parse_message
from xdc.faults import crash_point
from xdc.io.consume import Batch, ConsumeLoop, Letter, Prepared, Source
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import Record, consumer_lag
from xdc.io.offset_gaps import OffsetGap
from xdc.io.outbox import OutboxPublisher
from xdc.io.state import CatalogEntry, Conflict, MetaChange, Outgoing
from xdc.io.store import (
    CANNED_ACLS,
    META_SOURCE_DC,
    META_SOURCE_ETAG,
    META_SOURCE_KEY,
    META_SOURCE_SEQUENCER,
    CopyJob,
    CopyResult,
    ObjectInfo,
    S3Store,
    tags_json,
)
from xdc.metrics import METRICS, Metrics, observe_many
from xdc.routing import Routed, route_event
from xdc.stats import Reservoir
from xdc.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class MirrorStats:
    batches: int = 0
    records: int = 0
    applied: int = 0
    meta_applied: int = 0  # tag and ACL changes
    ignored: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    bytes_copied: int = 0
    etag_changed: int = 0  # objects copied with another ETag than the source's (state: etag_changes)
    lags: Reservoir = field(default_factory=Reservoir)  # bounded: a --follow process runs for months
    seconds: float = 0.0
    busy_seconds: float = 0.0  # time spent applying batches (not waiting for events)

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "records": self.records, "applied": self.applied,
                "meta_applied": self.meta_applied,
                "ignored": dict(self.ignored), "dead_letters": self.dead_letters,
                "bytes_copied": self.bytes_copied, "etag_changed": self.etag_changed, "seconds": round(self.seconds, 3),
                "busy_seconds": round(self.busy_seconds, 3),
                "lag_p50_s": self.lags.percentile(50), "lag_p99_s": self.lags.percentile(99),
                "lag_max_s": self.lags.max}


class TargetUnavailable(XdcError):
    """Some copies found an endpoint unreachable: the batch waits for it (nothing is dead-lettered)."""

    retriable = True


class Skipped(Exception):
    """A two-way rule left the target as it is (echo, same content, a local write that wins):
    counted by `reason`; `entry` (an acknowledgment) is recorded when there is one."""

    def __init__(self, reason: str, entry: CatalogEntry | None = None) -> None:
        super().__init__(reason)
        self.reason, self.entry = reason, entry


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
        self.outbox = OutboxPublisher(self.catalog, lambda: self.producer, lambda: self.site.consumer(None),
                                      name="mirror", tag=f"{self.dc}:")
        self._pool = ThreadPoolExecutor(self.settings.copy_concurrency, thread_name_prefix="copy")
        self._consumers: dict[str, KafkaConsumer] = {}
        self.gap_healer = GapHealer(topology, self.group_id, self.routes, self.metrics)
        self._lag_observed_at = 0.0
        self._verify_observed_at = -1e9
        self._swept_at = float("-inf")  # the first batch with copies sweeps
        sources = []
        for src in sorted({r.source.dc for r in self.routes}):
            site = topology.site(src)
            self._consumers[src] = site.consumer(self.group_id)
            sources.append(Source(src, self._consumers[src], self.group_id, (site.topics.events,)))
            self.metrics.event_gaps_total.labels(site.topics.events)  # zero series for increase()
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
        if not self.gap_healer.wait(30.0):  # a huge route: left to the next start (its gaps stay pending)
            log.warning("gap repair still running at close; the next start drives it again")
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
            published = self.gap_healer.repairs_published
            self.gap_healer.resume()  # gaps a previous process recorded and did not finish repairing
            self._warm_copies()
            ls = self.loop.run(once=once, max_seconds=max_seconds, stop=stop, join_timeout_s=join_timeout_s)
            # `once` means caught up, gap repairs included: what a repair published is applied too
            while once and not (stop and stop.is_set()) and self.gap_healer.wait(max_seconds) and \
                    self.gap_healer.repairs_published > published:
                published = self.gap_healer.repairs_published
                ls = self.loop.run(once=True, max_seconds=max_seconds, stop=stop, join_timeout_s=join_timeout_s)
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
        """validate -> route -> decide -> copy / delete / reconcile -> tags and ACL here; the
        returned `durable` part does the state transaction, the outbox publish and the batch's
        spans (the loop runs it on its writer thread, in batch order, while it prepares the next)."""
        tr = self._trace = BatchTrace(self.dc, batch)  # spans of the traced objects (mirror/tracing.py)
        letters: list[Letter] = []
        work = plan_batch(self._validate_and_route(batch, letters))  # decide
        self._ignore("", "superseded_in_batch", sum(w.superseded for w in work.values()), metric=False)
        current = self.catalog.get_many(work)
        todo: list[tuple[Routed, KeyWork]] = []
        for k, w in work.items():
            it = w.content
            if it is None:
                continue
            d = decide(it, current.get(k))
            if d == "apply":
                todo.append((it, w))
            else:
                self._ignore(it.route.name, d)

        tr.begin([it for it, _ in todo])
        done, unavailable = self._apply_content(todo, current, letters)  # copy / delete / reconcile
        meta, meta_unavailable = self._apply_meta([m for w in work.values() for m in w.meta.values()], letters)
        unavailable += meta_unavailable
        crash_point("mirror.after_copy")
        offsets: dict[tuple[str, str, int], int] = {}
        if not unavailable:  # a batch that waits for an endpoint records no offsets yet
            for rec in batch.records:
                k = (self.group_id, rec.topic, rec.partition)
                if rec.offset >= offsets.get(k, 0):
                    offsets[k] = rec.offset + 1
        routed_of = {id(e): it for it, e in done}
        entries = [e for _, e in done]
        changes = [m for _, m in meta]

        def outbox(ok: list[CatalogEntry]) -> list[Outgoing]:
            return _applied_messages(self.applied_topic, [(routed_of[id(e)], e) for e in ok if e.origin != "echo"],
                                     tr.headers)

        def durable() -> None:
            t_commit = time.time()
            # entries + tags/ACL + outbox + offsets in one transaction
            applied = self.catalog.commit_batch(entries, outbox, offsets, meta=changes)
            applied = [e for e in applied if e.origin != "echo"]  # acknowledgments (two-way) changed no object
            crash_point("mirror.after_state_commit")
            t_committed = time.time()
            self.flush_outbox()
            tr.finish(done, applied, t_commit, t_committed, time.time(),
                      error="endpoint unreachable: the batch is retried" if unavailable else None)
            crash_point("mirror.after_applied_publish")
            self._observe_applied(applied)
            for it, m in meta:
                self.metrics.events_applied_total.labels(it.route.name, m.kind).inc()
            with self._stats_lock:
                self.stats.meta_applied += len(meta)
            if unavailable:
                it, exc = unavailable[0]
                raise TargetUnavailable(f"{len(unavailable)} copies could not reach their endpoint, "
                                        f"e.g. {it.event.bucket}/{it.event.key}: {exc}")

        self._observe_consumer_lag(batch.source)  # the source's consumer: this thread only
        self._observe_verify()
        return Prepared(letters, durable)

    def on_gaps(self, source: str, gaps: list[OffsetGap]) -> None:
        """The consume loop found events of `source` this group will never read: record them and
        repair the routes they feed (mirror/gaps.py)."""
        self.gap_healer.record(source, gaps)

    def on_assigned(self, source: str, partitions: list[Any], consumer: KafkaConsumer) -> None:
        # in the rebalance listener (kafka-python's IO thread): log only, no broker call
        log.info("mirror into %s: assigned %s of %s", self.dc,
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)), source)

    def _ignore(self, route: str, reason: str, n: int = 1, *, metric: bool = True) -> None:
        """Count ignored events (from both of the loop's threads, and the copy pool's)."""
        if not n:
            return
        with self._stats_lock:
            self.stats.ignored[reason] += n
        if metric:
            self.metrics.events_ignored_total.labels(route=route, reason=reason).inc(n)

    def on_applied_through(self, source: str, at: float) -> None:
        """Every event `source` published before `at` is applied here (the consume loop's probe)."""
        for r in self.routes:
            if r.source.dc == source:
                self.metrics.replication_applied_through_timestamp_seconds.labels(r.name, source, self.dc).set(at)

    def _validate_and_route(self, batch: Batch, letters: list[Letter]) -> list[Routed]:
        m = self.settings
        routes = [r for r in self.routes if r.source.dc == batch.source]
        routed: list[Routed] = []
        for rec in batch.records:
            try:
                events = parse_message(rec.value, max_bytes=m.max_message_bytes, max_key_bytes=m.max_key_bytes)
                mine = []
                ignored: list[tuple[str, str]] = []
                for ev in events:
                    if isinstance(ev, IgnoredEvent):  # restore, replication, transition, ...: by design
                        ignored.append((self._route_name(ev.bucket, ev.key, routes), ev.reason))
                        continue
                    if not isinstance(ev, ObjectEvent):
                        self._ignore("", "not_object_event", metric=False)
                        continue
                    it = route_event(ev, routes, rec, m.max_key_bytes)
                    if it is None:
                        self._ignore("", "unrouted", metric=False)
                    else:
                        mine.append(it)
            except EventError as exc:  # a message with one bad record is dead-lettered whole
                log.warning("dead letter %s[%d]@%d: %s %s", rec.topic, rec.partition, rec.offset, exc.reason,
                            exc.detail[:200])
                letters.append(Letter(rec, exc.reason, exc.detail))
                continue
            for route, reason in ignored:
                self._ignore(route, reason)
            routed.extend(mine)
        return routed

    @staticmethod
    def _route_name(bucket: str, key: str, routes: list[Route]) -> str:
        return next((r.name for r in routes if bucket and r.source.covers(bucket, key)), "")

    # -- content: put, delete, reconciliation --------------------------------------------------
    def _apply_content(self, todo: list[tuple[Routed, KeyWork]], current: dict[tuple[str, str], CatalogEntry],
                       letters: list[Letter]
                       ) -> tuple[list[tuple[Routed, CatalogEntry]], list[tuple[Routed, StoreError]]]:
        """Copy, delete or reconcile each key (metadata routes record the event, or what a
        reconciliation read at the source). The batch's plain copies run together on the async copy
        engine (same parts, same ETag; metadata and tags kept), one `copy_many` per source
        datacenter; deletes, reconciliations and two-way puts meanwhile on the pool. Returns the entries to
        record and the items whose endpoint was unreachable."""
        entries: list[tuple[Routed, CatalogEntry]] = []
        futures = []
        puts: dict[str, list[Routed]] = {}
        for it, w in todo:
            cur = current.get((it.target_bucket, it.target_key))
            if it.event.reconcile:
                reconcile = functools.partial(self._reconcile, current=cur, floor=w.floor)
                futures.append((it, self._pool.submit(self._trace.bound(it, reconcile), it)))
            elif it.route.mode == "metadata":
                entries.append((it, entry_for(it, applied_time=time.time())))
            elif it.event.op == "delete" or it.route.two_way:
                # two-way puts: their rules look at the source before a byte is written (a guard of
                # the sync copy), and a delete there may meet a local write
                fn = functools.partial(self._delete if it.event.op == "delete" else self._copy_one, current=cur)
                futures.append((it, self._pool.submit(self._trace.bound(it, fn), it)))
            else:
                puts.setdefault(it.route.source.dc, []).append(it)
        outcomes: list[tuple[Routed, tuple[CatalogEntry, int] | StoreError | Skipped]] = []
        if puts:
            self._sweep_uploads()
        for src_dc, items in puts.items():
            jobs = [CopyJob(it.event.bucket, it.event.key, it.target_bucket, it.target_key,
                            expect_etag=it.event.etag or None, metadata=self._copy_meta(it),
                            trace=self._trace.parent(it)) for it in items]
            results = self.topology.site(src_dc).store.copy_many(self.target, jobs)
            outcomes.extend((it, self._copied(it, res)) for it, res in zip(items, results))
        for it, fut in futures:
            try:
                outcomes.append((it, fut.result()))
            except (StoreError, Skipped) as exc:
                outcomes.append((it, exc))
        unavailable: list[tuple[Routed, StoreError]] = []
        for it, res in outcomes:
            if isinstance(res, Skipped):
                self._ignore(it.route.name, res.reason)
                if res.entry is not None:
                    entries.append((it, res.entry))
                continue
            if isinstance(res, StoreError):
                exc = res
                if exc.fatal:  # e.g. an untrusted TLS certificate: no event is at fault, stop
                    raise exc
                if isinstance(exc, SupersededError):
                    self._ignore(it.route.name, "superseded")
                    log.info("%s", exc)
                    continue
                if isinstance(exc, UnavailableError):
                    unavailable.append((it, exc))
                    continue
                # permanent, or still failing after the copy's retries
                away = self._endpoint_away(it) if exc.retriable else None
                if away is not None:  # not the object's fault: the batch waits for the endpoint
                    unavailable.append((it, away))
                    continue
                reason = "copy_failed_after_retries" if exc.retriable else "copy_failed"
                letters.append(Letter(it.record, reason, f"{it.event.bucket}/{it.event.key}: {exc}"))
                self.metrics.events_failed_total.labels(route=it.route.name, reason=reason).inc()
                continue
            entry, copied = res
            entries.append((it, entry))
            if copied:
                with self._stats_lock:
                    self.stats.bytes_copied += copied
                self.metrics.bytes_copied_total.labels(route=it.route.name).inc(copied)
        return entries, unavailable

    def _copied(self, it: Routed, res: CopyResult | StoreError) -> tuple[CatalogEntry, int] | StoreError:
        """One copy's outcome as the entry to record (an ETag that changed is said durably)."""
        if isinstance(res, ObjectNotFound):  # the source object is gone: a newer event says so
            return SupersededError(f"{it.event.bucket}/{it.event.key} is gone from the source")
        if isinstance(res, StoreError):
            return res
        landed = res.landed
        if not res.etag_kept:
            self._etag_changed(it, res)
        return entry_for(it, applied_time=time.time(), size=landed.size, etag=landed.etag,
                         tags=tags_json(landed.tags)), landed.size

    def _etag_changed(self, it: Routed, res: CopyResult) -> None:
        """Say durably why the target's ETag differs from the source's (the catalog holds both)."""
        with self._stats_lock:
            self.stats.etag_changed += 1
        self.metrics.copies_etag_changed_total.labels(route=it.route.name).inc()
        log.warning("%s/%s copied with ETag %s (source %s): %s", it.target_bucket, it.target_key, res.landed.etag,
                    res.source_etag, res.note)
        self.site.state.incidents.record_etag_change(it.target_bucket, it.target_key, res.source_etag,
                                                     res.landed.etag, res.layout, res.note)

    def _warm_copies(self) -> None:
        """The data routes' copy clients, made and connected before the first batch (not inside it)."""
        for r in self.routes:
            if r.mode == "data":
                self.topology.site(r.source.dc).store.warm_copies(self.target, r.source.bucket, r.target.bucket)

    def _sweep_uploads(self) -> None:
        """Every `upload_sweep_minutes`, abort multipart uploads under the data routes' target
        prefixes older than `abandoned_upload_minutes` (a copier killed mid-copy left them)."""
        now = time.monotonic()
        if now - self._swept_at < self.settings.upload_sweep_minutes * 60:
            return
        self._swept_at = now
        for r in self.routes:
            if r.mode != "data":
                continue
            try:
                self.target.sweep_uploads(r.target.bucket, r.target.prefix,
                                          older_than_s=self.settings.abandoned_upload_minutes * 60)
            except StoreError as exc:  # the sweep is housekeeping: the copies go on
                if exc.fatal:
                    raise
                log.warning("sweep of uploads under %s/%s: %s", r.target.bucket, r.target.prefix, exc)

    def _endpoint_away(self, it: Routed) -> StoreError | None:
        """After a copy's retries are spent on errors that may pass (timeouts, resets, 5xx): is
        an endpoint down, or is it this object? One HEAD bucket each way, not retried: an error
        there (a link cut mid-copy shows as read timeouts first, then as unreachable) means the
        endpoint, and the batch waits instead of dead-lettering the object."""
        for store, bucket in ((self._source(it), it.event.bucket), (self.target, it.target_bucket)):
            try:
                store.ping(bucket)
            except StoreError as exc:
                if exc.fatal:
                    raise
                if exc.retriable:
                    return exc
        return None

    def _source(self, it: Routed) -> S3Store:
        return self.topology.site(it.route.source.dc).store

    def _copy_meta(self, it: Routed) -> dict[str, str]:
        meta = {META_SOURCE_DC: it.route.source.dc, META_SOURCE_KEY: mark_key(it.event.key)}
        if it.event.sequencer:
            meta[META_SOURCE_SEQUENCER] = it.event.sequencer.rstrip("0") or "0"
        return meta

    def _copy_one(self, it: Routed, current: CatalogEntry | None = None) -> tuple[CatalogEntry, int]:
        guard, outcome = self._two_way_guard(it, current) if it.route.two_way else (None, {})
        try:
            landed = self._source(it).copy_to(self.target, it.event.bucket, it.event.key, it.target_bucket,
                                              it.target_key, expect_etag=it.event.etag or None,
                                              metadata=self._copy_meta(it), guard=guard)
        except ObjectNotFound as exc:
            raise SupersededError(f"{it.event.bucket}/{it.event.key} is gone from the source") from exc
        except CalledOff as off:
            raise self._called_off(it, off) from None
        if "conflict" in outcome:
            self._report_conflict(outcome["conflict"])
        return entry_for(it, applied_time=time.time(), size=landed.size, etag=landed.etag,
                         tags=tags_json(landed.tags)), landed.size

    # -- two-way routes: echoes and concurrent writes (rules in mirror/twoway.py) ---------------
    def _local_version(self, it: Routed) -> Version | None:
        # A HEAD of the target: a write made in this datacenter is announced only to the other
        # direction's mirror, so neither the event nor this state can tell whether the key holds one.
        try:
            return Version.of(self.dc, self.target.head(it.target_bucket, it.target_key))
        except ObjectNotFound:
            return None

    @staticmethod
    def _acked(current: CatalogEntry | None) -> str | None:
        """The local version the source is known to hold (its echo came back), if any."""
        return current.etag if current is not None and current.origin == "echo" and not current.deleted else None

    def _two_way_guard(self, it: Routed, current: CatalogEntry | None
                       ) -> tuple[Callable[[ObjectInfo], None], dict[str, Conflict]]:
        """A guard for the copy: it sees the source's GET answer (metadata, Last-Modified) before a
        byte is written, so an echo costs no request of its own; the target's HEAD is made only
        when the source is not an echo."""
        outcome: dict[str, Conflict] = {}

        def guard(info: ObjectInfo) -> None:
            src = Version.of(it.route.source.dc, info)
            local = None if src.mark_dc == self.dc else self._local_version(it)
            verdict = settle_put(src, local, target_dc=self.dc, target_key=it.target_key,
                                 acked_etag=self._acked(current))
            if verdict in ("echo", "same", "keep_local"):
                raise CalledOff(verdict, src, local)
            if verdict == "overwrite_local" and local is not None:
                kept = conflict_key(it.target_key, local)
                self.target.copy_to(self.target, it.target_bucket, it.target_key, it.target_bucket, kept,
                                    expect_etag=local.etag)
                outcome["conflict"] = Conflict(it.route.name, it.target_bucket, it.target_key, src.dc, src.etag,
                                               local.dc, local.etag, kept, "last_writer_wins",
                                               f"Last-Modified {src.mtime} ({src.dc}) > {local.mtime} ({local.dc})")
        return guard, outcome

    def _called_off(self, it: Routed, off: CalledOff) -> Skipped:
        if off.verdict == "keep_local":  # the other side's mirror overwrites and reports
            return Skipped("conflict_lost")
        # echo / same: the target holds the version; acknowledge it (origin "echo", its ETag)
        held = off.local.etag if off.verdict == "same" and off.local is not None else off.src.mark_etag or off.src.etag
        return Skipped(off.verdict, entry_for(it, applied_time=time.time(), size=it.event.size, etag=held,
                                              origin="echo", source_etag=off.src.etag))

    def _report_conflict(self, c: Conflict) -> None:
        log.warning("two-way conflict on %s %s/%s: %s wins over %s (%s kept at %s)", c.route, c.bucket, c.key,
                    c.winner_dc, c.loser_dc, c.loser_etag, c.kept_key)
        self.site.state.incidents.record_conflict(c)
        self.metrics.conflicts_total.labels(route=c.route).inc()

    def _delete(self, it: Routed, current: CatalogEntry | None = None) -> tuple[CatalogEntry, int]:
        if it.route.two_way:
            local = self._local_version(it)
            if settle_delete(local, source_dc=it.route.source.dc, acked_etag=self._acked(current)) != "delete":
                assert local is not None
                self._report_conflict(Conflict(it.route.name, it.target_bucket, it.target_key, local.dc, local.etag,
                                               it.route.source.dc, "", None, "write_beats_delete",
                                               "a delete met a write the source had not seen"))
                raise Skipped("write_beats_delete")
        try:
            self.target.delete(it.target_bucket, it.target_key)
        except ObjectNotFound:
            pass  # already gone: deletes are idempotent
        return entry_for(it, applied_time=time.time(), size=0, etag=""), 0

    def _reconcile(self, it: Routed, current: CatalogEntry | None, floor: str) -> tuple[CatalogEntry, int]:
        """Make the target match the source's current state of the key (HEAD: ETag, size,
        last-modified), whatever the event said; keep the newest S3 sequencer seen (`floor`, or
        the state's), so the S3 events that follow are ordered as before."""
        seq = max(current.sequencer if current else "", floor)
        src = self._source(it)
        for _ in range(3):  # the source may change between our HEAD and our GET: look again
            try:
                info: ObjectInfo | None = src.head(it.event.bucket, it.event.key)
            except ObjectNotFound:
                info = None
            now = time.time()
            if info is None:
                if it.route.mode == "data":
                    self._delete(it)
                return entry_for(it, applied_time=now, size=0, etag="", deleted=True, source_etag="",
                                 sequencer=seq, origin="reconcile"), 0
            if it.route.mode == "metadata":
                return entry_for(it, applied_time=now, size=info.size, etag=info.etag, deleted=False,
                                 source_etag=info.etag, sequencer=seq, origin="reconcile"), 0
            try:
                have = self.target.head(it.target_bucket, it.target_key)
            except ObjectNotFound:
                have = None
            if have is not None and have.size == info.size and info.etag in (
                    have.etag, have.metadata.get(META_SOURCE_ETAG)):
                return entry_for(it, applied_time=now, size=have.size, etag=have.etag, deleted=False,
                                 source_etag=info.etag, sequencer=seq, origin="reconcile"), 0
            try:
                landed = src.copy_to(self.target, it.event.bucket, it.event.key, it.target_bucket, it.target_key,
                                     expect_etag=info.etag, metadata=self._copy_meta(it))
            except (SupersededError, ObjectNotFound):
                continue
            return entry_for(it, applied_time=time.time(), size=landed.size, etag=landed.etag, deleted=False,
                             source_etag=info.etag, sequencer=seq, origin="reconcile",
                             tags=tags_json(landed.tags)), landed.size
        raise SupersededError(f"{it.event.bucket}/{it.event.key} keeps changing at the source: the next event repairs it")

    # -- tags and ACL ----------------------------------------------------------------------------
    def _apply_meta(self, items: list[Routed], letters: list[Letter]
                    ) -> tuple[list[tuple[Routed, MetaChange]], list[tuple[Routed, StoreError]]]:
        """Tag / ACL events: read the source's current tags / ACL, put them on the target object
        (data routes), and record them in the state (both modes)."""
        futures = [(it, self._pool.submit(self._meta_one, it)) for it in items]
        out: list[tuple[Routed, MetaChange]] = []
        unavailable: list[tuple[Routed, StoreError]] = []
        for it, fut in futures:
            try:
                change = fut.result()
            except ObjectNotFound:
                self._ignore(it.route.name, "no_object")  # gone meanwhile: its delete follows
                continue
            except UnavailableError as exc:
                unavailable.append((it, exc))
                continue
            except StoreError as exc:
                if exc.fatal:  # a misconfiguration: no event is at fault, stop
                    raise
                reason = "copy_failed_after_retries" if exc.retriable else "copy_failed"
                letters.append(Letter(it.record, reason, f"{it.event.event_name} {it.event.bucket}/{it.event.key}: {exc}"))
                self.metrics.events_failed_total.labels(route=it.route.name, reason=reason).inc()
                continue
            out.append((it, change))
        return out, unavailable

    def _meta_one(self, it: Routed) -> MetaChange:
        src, ev = self._source(it), it.event
        if ev.op == "tags":
            tags = src.get_tags(ev.bucket, ev.key)
            if it.route.mode == "data":
                self.target.put_tags(it.target_bucket, it.target_key, tags)
            return MetaChange(it.target_bucket, it.target_key, "tags", tags_json(tags))
        acl = src.get_acl(ev.bucket, ev.key)
        if it.route.mode == "data":
            if acl in CANNED_ACLS:
                self.target.put_acl(it.target_bucket, it.target_key, acl)
            else:  # grants that name accounts of the source mean nothing here: recorded only
                self._ignore(it.route.name, "acl_not_canned")
        return MetaChange(it.target_bucket, it.target_key, "acl", acl)

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

    def on_idle(self) -> None:
        self._observe_verify()
        self.gap_healer.on_idle()

    def _observe_verify(self) -> None:
        """Each route's last verify (recorded in this datacenter's state by whoever ran it: the CLI,
        the DAG) as the drift gauge of this long-running, scraped process, once a minute."""
        now = time.monotonic()
        if now - self._verify_observed_at < 60.0:
            return
        self._verify_observed_at = now
        latest = self.site.state.verify.latest()
        for r in self.routes:
            run = latest.get(r.name)
            if run is not None:
                self.metrics.verify_drift_objects.labels(r.name).set(run["missing"] + run["extra"] + run["differ"])
                self.metrics.verify_last_run_timestamp_seconds.labels(r.name).set(run["finished"])

    def _observe_consumer_lag(self, source: str) -> None:
        # committed() is a broker round trip per partition: once every few seconds is plenty
        now = time.monotonic()
        if now - self._lag_observed_at < 5.0:
            return
        self._lag_observed_at = now
        for tp, lag in consumer_lag(self._consumers[source]).items():
            self.metrics.consumer_lag_messages.labels(self.group_id, tp.topic, str(tp.partition)).set(lag)


def _applied_messages(topic: str, done: list[tuple[Routed, CatalogEntry]],
                      headers: Callable[[list[Routed]], list[tuple[str, bytes]]] = lambda _: []) -> list[Outgoing]:
    """One applied message per source partition per batch, holding that partition's objects in order.

    Keyed by the source partition, so one object's applied events always share a partition and stay
    in order; batching cut the publish cost per object by the batch size.
    """
    by_part: dict[int, list[AppliedEvent]] = {}
    routed: dict[int, list[Routed]] = {}
    for it, e in done:
        routed.setdefault(it.record.partition, []).append(it)
        by_part.setdefault(it.record.partition, []).append(AppliedEvent(
            e.route, "delete" if e.deleted else "put", e.bucket, e.key, e.size, e.etag, e.sequencer, e.event_time,
            e.applied_time, {"dc": e.source_dc, "bucket": e.source_bucket, "key": e.source_key,
                             "etag": e.source_etag}))
    return [Outgoing(topic, f"p{part}".encode(), encode_applied(items), tuple(headers(routed[part])))
            for part, items in sorted(by_part.items())]


__all__ = ["Mirror", "MirrorStats", "Record"]
