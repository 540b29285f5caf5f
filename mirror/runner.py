"""The mirror loop: consume a batch -> validate -> route -> decide -> copy -> catalog -> applied
events -> commit offsets. Offsets are committed only after the catalog transaction is durable.

At-least-once delivery with idempotent apply: a batch delivered again finds its sequencers in the
catalog and is ignored; the outbox guarantees the applied events of a committed batch go out even
when the process dies between the catalog commit and the publish.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mirror.apply import Routed, collapse, decide, entry_for, route_event
from mirror.catalog import CatalogEntry, Outgoing, SqliteCatalog
from mirror.dlq import DeadLetterSink
from mirror.events import AppliedEvent, ObjectEvent, encode_applied, parse_message
from xdc.config import XdcConfig
from xdc.errors import EventError, KafkaError, ObjectNotFound, StoreError, XdcError
from xdc.kafka import Record, caught_up, commit, consumer_lag, kafka_errors, make_consumer, make_producer, to_records
from xdc.metrics import METRICS, Metrics
from xdc.store import Store, SupersededError, retry, store_for

log = logging.getLogger(__name__)


@dataclass
class _Counts:
    records: int = 0
    applied: int = 0
    ignored: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    bytes_copied: int = 0
    lags: list[float] = field(default_factory=list)


@dataclass
class BatchResult(_Counts):
    letters: list[tuple[Record, str, str]] = field(default_factory=list)  # sent just before commit


@dataclass
class MirrorStats(_Counts):
    batches: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0  # time spent applying batches (not waiting for events)

    def add(self, b: BatchResult) -> None:
        self.batches += 1
        self.records += b.records
        self.applied += b.applied
        self.ignored.update(b.ignored)
        self.dead_letters += b.dead_letters
        self.bytes_copied += b.bytes_copied
        self.lags.extend(b.lags)

    def to_dict(self) -> dict[str, Any]:
        from xdc.stats import percentile
        return {"batches": self.batches, "records": self.records, "applied": self.applied,
                "ignored": dict(self.ignored), "dead_letters": self.dead_letters,
                "bytes_copied": self.bytes_copied, "seconds": round(self.seconds, 3),
                "busy_seconds": round(self.busy_seconds, 3),
                "lag_p50_s": percentile(self.lags, 50), "lag_p99_s": percentile(self.lags, 99),
                "lag_max_s": max(self.lags) if self.lags else None}


MAX_KAFKA_FAILURES = 30  # consecutive broker errors (about 2 minutes of backoff) before giving up


class TransientBatchError(XdcError):
    retriable = True


class Mirror:
    """Mirrors every route into `dc` (this process's datacenter) from each source datacenter."""

    def __init__(self, cfg: XdcConfig, dc: str | None = None, *, metrics: Metrics | None = None,
                 group_id: str | None = None) -> None:
        self.cfg = cfg.with_local_dc(dc) if dc else cfg
        self.dc = self.cfg.require_local_dc()
        self.routes = self.cfg.routes_into(self.dc)
        self.metrics = metrics or METRICS
        self.group_id = group_id or f"{self.cfg.mirror.group_id}.{self.dc}"
        self.catalog = SqliteCatalog(self.cfg.catalog_path(self.dc))
        self.target: Store = store_for(self.cfg, self.dc)
        self._sources: dict[str, Store] = {}
        self.producer = make_producer(self.cfg.brokers(self.dc))
        self.applied_topic = self.cfg.dc(self.dc).kafka.topics.applied
        self.dlq = DeadLetterSink(self.producer, self.cfg.dc(self.dc).kafka.topics.dead_letter, self.catalog,
                                  on_letter=self._count_dead_letter)
        self._pool = ThreadPoolExecutor(self.cfg.mirror.copy_concurrency, thread_name_prefix="copy")
        self._consumers: dict[str, Any] = {}
        self._transient_rounds = 0  # consecutive retries of the current batch
        self._lag_observed_at = 0.0
        self.alive = True  # for /healthz
        self.caught_up = False  # for /readyz and --once

    # -- plumbing ---------------------------------------------------------------------------
    def source_store(self, dc: str) -> Store:
        if dc not in self._sources:
            self._sources[dc] = store_for(self.cfg, dc)
        return self._sources[dc]

    def consumers(self) -> dict[str, Any]:
        if not self._consumers:
            k = self.cfg.dc(self.dc).kafka
            for src in sorted({r.source.dc for r in self.routes}):
                topic = self.cfg.dc(src).kafka.topics.events
                self._consumers[src] = make_consumer(
                    self.cfg.brokers(src), self.group_id, [topic],
                    session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms)
        return self._consumers

    def close(self) -> None:
        for c in self._consumers.values():
            try:
                c.close(autocommit=False)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._consumers.clear()
        self._pool.shutdown(wait=True)
        try:
            self.producer.close(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        self.catalog.close()

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count_dead_letter(self, topic: str, reason: str) -> None:
        self.metrics.dead_letters_total.labels(topic=topic, reason=reason).inc()

    # -- the loop ---------------------------------------------------------------------------
    def run(self, *, once: bool = False, max_seconds: float | None = None,
            stop: threading.Event | None = None, idle_polls_to_finish: int = 2,
            join_timeout_s: float = 60.0) -> MirrorStats:
        """`once`: stop when caught up (every assigned partition at its highwater)."""
        stats = MirrorStats()
        t0 = time.monotonic()
        self.flush_outbox()  # what a previous process committed but did not publish
        idle = 0
        batch_failures = 0
        kafka_failures = 0  # consecutive broker errors; the loop gives up after MAX_KAFKA_FAILURES
        while not (stop and stop.is_set()):
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                break
            progressed = False
            for src, consumer in self.consumers().items():
                try:
                    with kafka_errors("poll"):
                        polled = consumer.poll(timeout_ms=int(self.cfg.mirror.batch_max_seconds * 1000),
                                               max_records=self.cfg.mirror.batch_max_records)
                except KafkaError as exc:  # broker away: kafka-python reconnects; wait for it
                    kafka_failures = self._kafka_trouble(kafka_failures, "poll", exc)
                    continue
                records = to_records(polled)
                if records:
                    self.caught_up = False
                    t_batch = time.monotonic()
                    try:
                        res = self.process(src, records)
                        batch_failures = 0
                    except TransientBatchError as exc:
                        batch_failures += 1
                        delay = min(10.0, 0.2 * 2 ** batch_failures) * random.uniform(0.5, 1.0)
                        log.warning("batch failed (%s); rewinding and retrying in %.1fs", exc, delay)
                        self._rewind(consumer, records)
                        time.sleep(delay)
                        continue
                    except KafkaError as exc:  # dead letters or outbox not published: redo the batch
                        self._rewind(consumer, records)
                        kafka_failures = self._kafka_trouble(kafka_failures, "batch", exc)
                        continue
                    try:
                        commit(consumer, records)
                    except KafkaError as exc:
                        # The batch is in the catalog; deliver it again (ignored as duplicates) and
                        # commit then. After a broker restart the group is rejoined on the next poll.
                        self._rewind(consumer, records)
                        kafka_failures = self._kafka_trouble(kafka_failures, "commit", exc)
                        continue
                    kafka_failures = 0
                    stats.add(res)
                    stats.busy_seconds += time.monotonic() - t_batch
                    progressed = True
                self._observe_consumer_lag(consumer)
            if progressed:
                idle = 0
                continue
            self.caught_up = all(caught_up(c) for c in self.consumers().values())
            if once:
                idle += 1
                joined = all(c.assignment() for c in self.consumers().values())
                if (joined and self.caught_up and idle >= idle_polls_to_finish) or \
                        (not joined and time.monotonic() - t0 > join_timeout_s):
                    break
        stats.seconds = time.monotonic() - t0
        return stats

    def _rewind(self, consumer: Any, records: list[Record]) -> None:
        from kafka import TopicPartition
        first: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        assigned = consumer.assignment()
        for tp, off in first.items():
            if tp in assigned:  # after a rebalance the new owner starts from the committed offset
                consumer.seek(tp, off)

    def _kafka_trouble(self, failures: int, what: str, exc: KafkaError) -> int:
        failures += 1
        if failures > MAX_KAFKA_FAILURES or not exc.retriable:  # settings or rights: no retry helps
            raise exc
        delay = min(5.0, 0.1 * 2 ** failures) * random.uniform(0.5, 1.0)
        log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc, failures, MAX_KAFKA_FAILURES, delay)
        time.sleep(delay)
        return failures

    def _observe_consumer_lag(self, consumer: Any) -> None:
        # committed() is a broker round trip per partition: once every few seconds is plenty
        now = time.monotonic()
        if now - self._lag_observed_at < 5.0:
            return
        self._lag_observed_at = now
        for tp, lag in consumer_lag(consumer).items():
            self.metrics.consumer_lag_messages.labels(self.group_id, tp.topic, str(tp.partition)).set(lag)

    # -- one batch --------------------------------------------------------------------------
    def process(self, source_dc: str, records: list[Record]) -> BatchResult:
        res = BatchResult(records=len(records))
        m = self.cfg.mirror
        routes = [r for r in self.routes if r.source.dc == source_dc]
        routed: list[Routed] = []
        for rec in records:  # validate
            try:
                events = parse_message(rec.value, max_bytes=m.max_message_bytes, max_key_bytes=m.max_key_bytes)
            except EventError as exc:
                self._dead_letter(res, rec, exc.reason, exc.detail)
                continue
            except Exception as exc:  # noqa: BLE001 - a parser bug must not become a poison pill
                log.exception("unexpected error parsing %s[%d]@%d", rec.topic, rec.partition, rec.offset)
                self._dead_letter(res, rec, "unexpected_error", repr(exc))
                continue
            bad = False
            batch_routed = []
            for ev in events:
                if not isinstance(ev, ObjectEvent):
                    res.ignored["not_object_event"] += 1
                    continue
                try:
                    it = route_event(ev, routes, rec, m.max_key_bytes)
                except EventError as exc:
                    self._dead_letter(res, rec, exc.reason, exc.detail)
                    bad = True
                    break
                except Exception as exc:  # noqa: BLE001 - as above
                    log.exception("unexpected error routing %s[%d]@%d", rec.topic, rec.partition, rec.offset)
                    self._dead_letter(res, rec, "unexpected_error", repr(exc))
                    bad = True
                    break
                if it is None:
                    res.ignored["unrouted"] += 1
                else:
                    batch_routed.append(it)
            if not bad:
                routed.extend(batch_routed)

        items = collapse(routed)  # decide
        res.ignored["superseded_in_batch"] += len(routed) - len(items)
        current = self.catalog.get_many((it.target_bucket, it.target_key) for it in items)
        todo: list[Routed] = []
        for it in items:
            d = decide(it, current.get((it.target_bucket, it.target_key)))
            if d == "apply":
                todo.append(it)
            else:
                res.ignored[d] += 1
                self.metrics.events_ignored_total.labels(route=it.route.name, reason=d).inc()

        done = self._apply_data(todo, res)  # copy / delete where mode is data
        routed_of = {id(e): it for it, e in done}
        offsets = {}
        for rec in records:
            k = (self.group_id, rec.topic, rec.partition)
            offsets[k] = max(offsets.get(k, 0), rec.offset + 1)
        for rec, reason, detail in res.letters:
            self.dlq.send(rec, reason, detail, origin_dc=source_dc)
        self.dlq.flush()  # dead letters are durable before their offsets are committed
        now_entries = self.catalog.commit_batch(  # durable
            [e for _, e in done],
            lambda applied: _applied_messages(self.applied_topic, [(routed_of[id(e)], e) for e in applied]),
            offsets)
        self.flush_outbox()
        self._observe_applied(now_entries, res)
        res.applied = len(now_entries)
        return res

    def _observe_applied(self, entries: list[CatalogEntry], res: BatchResult) -> None:
        """Lag histogram and counters, one label lookup per route and batch (not per event)."""
        by_route: dict[tuple[str, str], list[CatalogEntry]] = {}
        for e in entries:
            by_route.setdefault((e.route, e.source_dc), []).append(e)
        m = self.metrics
        for (route, src), es in by_route.items():
            hist = m.replication_lag_seconds.labels(route, src, self.dc)
            for e in es:
                lag = max(0.0, e.applied_time - e.event_time)  # clock skew counts as 0, not dropped
                res.lags.append(lag)
                hist.observe(lag)
            deletes = sum(1 for e in es if e.deleted)
            if deletes:
                m.events_applied_total.labels(route, "delete").inc(deletes)
            if len(es) - deletes:
                m.events_applied_total.labels(route, "put").inc(len(es) - deletes)
            m.last_apply_timestamp_seconds.labels(route).set(max(e.applied_time for e in es))

    def _apply_data(self, todo: list[Routed], res: BatchResult) -> list[tuple[Routed, CatalogEntry]]:
        """Copy or delete object data for data-mode routes; metadata-mode items pass through."""
        entries: list[tuple[Routed, CatalogEntry]] = []
        futures = []
        for it in todo:
            if it.route.mode == "metadata":
                entries.append((it, entry_for(it, applied_time=time.time())))
            elif it.event.op == "delete":
                futures.append((it, self._pool.submit(self._delete, it)))
            else:
                futures.append((it, self._pool.submit(self._copy, it)))
        transient: list[tuple[Routed, StoreError]] = []
        for it, fut in futures:
            try:
                size, etag = fut.result()
                entries.append((it, entry_for(it, applied_time=time.time(), size=size, etag=etag)))
                if it.event.op == "put":
                    res.bytes_copied += size
                    self.metrics.bytes_copied_total.labels(route=it.route.name).inc(size)
            except SupersededError as exc:
                res.ignored["superseded"] += 1
                log.info("%s", exc)
            except StoreError as exc:
                if exc.retriable:
                    transient.append((it, exc))
                else:
                    self._dead_letter(res, it.record, "copy_failed", f"{it.event.bucket}/{it.event.key}: {exc}")
                    self.metrics.events_failed_total.labels(route=it.route.name, reason="copy_failed").inc()
        if transient:
            self._transient_rounds += 1
            if self._transient_rounds <= self.cfg.mirror.max_attempts:
                it, exc = transient[0]
                raise TransientBatchError(f"{len(transient)} transient failures, e.g. {it.event.key}: {exc}")
            # The batch was retried enough: these objects fail for good, the rest proceeds.
            for it, exc in transient:
                self._dead_letter(res, it.record, "copy_failed_after_retries",
                                  f"{it.event.bucket}/{it.event.key}: {exc}")
                self.metrics.events_failed_total.labels(route=it.route.name, reason="retries_exhausted").inc()
        self._transient_rounds = 0
        return entries

    def _copy(self, it: Routed) -> tuple[int, str]:
        src = self.source_store(it.route.source.dc)
        meta = {"xdc-source-sequencer": it.event.sequencer.rstrip("0") or "0"}

        def once() -> tuple[int, str]:
            try:
                landed = src.copy_to(self.target, it.event.bucket, it.event.key, it.target_bucket,
                                     it.target_key, expect_etag=it.event.etag or None, metadata=meta)
            except ObjectNotFound as exc:
                raise SupersededError(f"{it.event.bucket}/{it.event.key} is gone from the source") from exc
            return landed.size, landed.etag
        return retry(once, what=f"copy {it.event.bucket}/{it.event.key}", attempts=self.cfg.mirror.max_attempts)

    def _delete(self, it: Routed) -> tuple[int, str]:
        try:
            self.target.delete(it.target_bucket, it.target_key)
        except ObjectNotFound:
            pass  # already gone: deletes are idempotent
        return 0, ""

    def _dead_letter(self, res: BatchResult, rec: Record, reason: str, detail: str) -> None:
        """Queued, sent just before the batch commits: a retried batch does not send twice."""
        log.warning("dead letter %s[%d]@%d: %s %s", rec.topic, rec.partition, rec.offset, reason, detail[:200])
        res.letters.append((rec, reason, detail))
        res.dead_letters += 1

    def flush_outbox(self) -> int:
        pending = self.catalog.pending_outbox()
        if not pending:
            return 0
        with kafka_errors("publish applied events"):
            for _, o in pending:
                self.producer.send(o.topic, key=o.key, value=o.value)
            self.producer.flush(timeout=30)
        self.catalog.ack_outbox([i for i, _ in pending])
        return len(pending)


def _applied_messages(topic: str, done: list[tuple[Routed, CatalogEntry]]) -> list[Outgoing]:
    """One applied message per source partition per batch, holding that partition's objects in order.

    Keyed by the source partition, so one object's applied events always share a partition and stay
    in order; batching cut the publish cost per object by the batch size (one message per object
    was a third of the apply time).
    """
    by_part: dict[int, list[dict[str, Any]]] = {}
    for it, e in done:
        by_part.setdefault(it.record.partition, []).append(AppliedEvent(
            route=e.route, op="delete" if e.deleted else "put", bucket=e.bucket, key=e.key, size=e.size,
            etag=e.etag, sequencer=e.sequencer, event_time=e.event_time, applied_time=e.applied_time,
            source={"dc": e.source_dc, "bucket": e.source_bucket, "key": e.source_key, "etag": e.source_etag},
        ).to_dict())
    return [Outgoing(topic, f"p{part}".encode(), encode_applied(items)) for part, items in sorted(by_part.items())]
