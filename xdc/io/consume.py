"""The one consume loop: poll -> batch -> handler (its work made durable) -> dead letters -> commit.

Every consumer of the project runs on it (the mirror, the resize worker, the release follower,
dead-letter replay, the lag reader), like aiokafka's documented loop:

- a poll of one source gives a `Batch`: its records grouped by partition, in offset order;
- the handler does the batch's work and makes it durable before it returns; it names the records
  that go to the dead-letter topic (`Letter`);
- letters are sent and flushed, then the batch's offsets are committed (one commit per batch):
  the committed offset is never ahead of what is durable;
- a retriable error (`XdcError.retriable`) from the handler rewinds the batch and retries it after
  a capped backoff: while a dependency is unavailable the partition waits, nothing is skipped;
- any other error is a poison message somewhere in the batch: the records are handled one by one
  and the one that fails is dead-lettered with the reason (`ReasonedError.reason`, else
  `unexpected_error`), while the rest proceeds;
- a retriable broker error is retried with backoff (a restarted broker is waited for, up to
  `max_broker_failures` in a row); a commit refused after a rebalance is dropped (the partitions'
  new owner redoes the batch, which is idempotent); before partitions are revoked the handler's
  `on_revoked` runs;
- a source without a group (`Source.group is None`) is read from positions set by the caller and
  commits nothing (dead-letter listing, the lag reader).

Pipelined handlers (the mirror) split a batch in two: `prepare` (parse, decide, copy: CPU and
object I/O) on the loop's thread, and the `durable` part it returns (the state transaction, the
outbox) on one writer thread, in batch order. The loop prepares batch N+1 while N is made durable,
and commits N's offsets once N's durable part is done: the same order of guarantees, with the
database's time overlapped. A durable part that fails stops the writer (later batches are not made
durable), every batch in flight is rewound, and the batch redelivered next is handled the plain
way (with the retries, backoff and poison-record search above) before pipelining resumes. Before
partitions are revoked, everything in flight is made durable and committed.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition

from xdc.errors import KafkaError, ReasonedError, RebalancedError, XdcError
from xdc.faults import crash_point
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import (
    Record,
    caught_up,
    commit,
    kafka_errors,
    next_offsets,
    rewind,
    to_records,
)
from xdc.retry import RetryPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """The records of one poll of one source, by partition in offset order."""

    source: str  # the datacenter whose broker they came from
    records: list[Record]

    @property
    def partitions(self) -> dict[tuple[str, int], list[Record]]:
        out: dict[tuple[str, int], list[Record]] = {}
        for r in self.records:
            out.setdefault((r.topic, r.partition), []).append(r)
        return out

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class Letter:
    """A record that cannot be handled, and why (sent to the dead-letter topic unchanged)."""

    record: Record
    reason: str
    detail: str = ""


class Handler(Protocol):
    def handle(self, batch: Batch) -> Sequence[Letter]:
        """Do the batch's work durably; return the records to dead-letter."""
        ...


@dataclass
class Prepared:
    """A batch whose work is done but for making it durable (`durable`, run on the writer thread)."""

    letters: list[Letter]
    durable: Callable[[], None]


class PipelinedHandler(Handler, Protocol):
    def prepare(self, batch: Batch) -> Prepared:
        """Everything but the durable part; `handle` is `prepare` then `durable` in one go."""
        ...


@dataclass
class _InFlight:
    source: Source
    batch: Batch
    letters: list[Letter]
    done: Future[None]
    started: float


class _Skipped(Exception):
    """A durable part not run because an earlier one failed (its batch is redone)."""


@dataclass
class Source:
    name: str  # datacenter
    consumer: KafkaConsumer
    group: str | None  # None: positions set by the caller, nothing committed
    topics: tuple[str, ...] = ()


@dataclass
class LoopStats:
    batches: int = 0
    records: int = 0
    dead_letters: int = 0
    retries: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0  # time in the handler (not waiting for records)
    letters_by_reason: dict[str, int] = field(default_factory=dict)


class _Revocations(ConsumerRebalanceListener):
    def __init__(self, loop: ConsumeLoop, source: Source) -> None:
        self.loop, self.source = loop, source

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.loop.settle()  # what is in flight becomes durable and committed while we own it
        hook = getattr(self.loop.handler, "on_revoked", None)
        if hook is not None and revoked:
            hook(self.source.name, list(revoked))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        hook = getattr(self.loop.handler, "on_assigned", None)
        if hook is not None and assigned:
            hook(self.source.name, list(assigned), self.source.consumer)


class ConsumeLoop:
    def __init__(self, sources: Sequence[Source], handler: Handler, *,
                 dead_letters: DeadLetterSink | None = None, max_records: int = 500,
                 poll_timeout_s: float = 1.0, retry: RetryPolicy = RetryPolicy(max_attempts=0, cap_s=10.0),
                 max_broker_failures: int = 30, name: str = "consume", pipeline: bool = True) -> None:
        """`retry.max_attempts` bounds the tries of a batch that keeps failing with a retriable
        error (0: until it works); after that its records are dead-lettered with the reason.
        `max_broker_failures` broker errors in a row (about two minutes of backoff) end the loop.
        `pipeline`: overlap a PipelinedHandler's durable part with the next batch."""
        self.sources = list(sources)
        self.handler = handler
        self.dead_letters = dead_letters
        self.max_records = max_records
        self.poll_timeout_ms = int(poll_timeout_s * 1000)
        self.retry = retry
        self.broker_retry = RetryPolicy(max_attempts=max_broker_failures, base_s=0.1, cap_s=5.0)
        self.name = name
        self.stats = LoopStats()
        self.alive = True  # for /healthz
        self.caught_up = False  # for /readyz and `once`
        self._writer: ThreadPoolExecutor | None = None
        if pipeline and callable(getattr(handler, "prepare", None)):
            self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-durable")
        self._inflight: deque[_InFlight] = deque()
        self._broken = False  # a durable part failed: later ones are skipped until the loop recovers
        self._plain_next = False  # the next batch is handled the plain way (after a failure in flight)
        for s in self.sources:
            if s.group is not None and s.topics:
                with kafka_errors(f"subscribe {s.name} {list(s.topics)}"):
                    s.consumer.subscribe(list(s.topics), listener=_Revocations(self, s))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # a durable part under way finishes (the state may run ahead)
        for s in self.sources:
            try:
                s.consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    # -- the loop -----------------------------------------------------------------------------
    def run(self, *, once: bool = False, max_seconds: float | None = None, stop: threading.Event | None = None,
            join_timeout_s: float = 60.0, idle_polls_to_finish: int = 2) -> LoopStats:
        """`once`: return when every source is caught up (assigned partitions at their end)."""
        st = self.stats
        t0 = time.monotonic()
        idle = 0
        broker_failures = 0
        self._handler_failures = 0
        try:
            while not (stop and stop.is_set()):
                if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                    break
                progressed = False
                for src in self.sources:
                    try:
                        with kafka_errors(f"poll {src.name}"):
                            polled = src.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
                    except KafkaError as exc:
                        broker_failures = self._broker_trouble(broker_failures, exc)
                        continue
                    records = to_records(polled)
                    if not records:
                        continue
                    self.caught_up = False
                    batch = Batch(src.name, records)
                    try:
                        if self._writer is not None and not self._plain_next:
                            self._pipelined(src, batch)
                        elif not self._plain(src, batch, stop):
                            continue
                    except KafkaError as exc:  # the commit: a broker error worth waiting for
                        broker_failures = self._broker_trouble(broker_failures, exc)
                        continue
                    broker_failures = 0
                    progressed = True
                if progressed:
                    idle = 0
                    continue
                try:
                    self.settle()  # idle: what is in flight becomes durable and committed now
                except KafkaError as exc:
                    broker_failures = self._broker_trouble(broker_failures, exc)
                    continue
                on_idle = getattr(self.handler, "on_idle", None)
                if on_idle is not None:
                    on_idle()
                self.caught_up = self._caught_up()
                if once:
                    idle += 1
                    joined = all(s.consumer.assignment() for s in self.sources)
                    if (joined and self.caught_up and idle >= idle_polls_to_finish) or \
                            (not joined and time.monotonic() - t0 > join_timeout_s):
                        break
            self.settle()  # stopped: finish what is in flight
        except BaseException:
            self.alive = False
            raise
        finally:
            st.seconds += time.monotonic() - t0
        return st

    def _plain(self, src: Source, batch: Batch, stop: threading.Event | None) -> bool:
        """handle -> letters -> commit. False when the batch was rewound for a retry."""
        t_batch = time.monotonic()
        try:
            letters = self._handle(batch)
            self._send_letters(letters, src.name)
        except XdcError as exc:
            if not exc.retriable:
                raise
            self._handler_failures += 1
            if self.retry.max_attempts and self._handler_failures >= self.retry.max_attempts:
                log.error("%s: batch failed %d times (%s): dead-lettering it", self.name, self._handler_failures, exc)
                self._send_letters([Letter(r, f"{_reason(exc)}_after_retries", str(exc)) for r in batch.records],
                                   src.name)
            else:
                rewind(src.consumer, batch.records)
                self.stats.retries += 1
                delay = self.retry.delay(self._handler_failures)
                log.warning("%s: batch of %d from %s failed (%s); retry in %.1fs", self.name, len(batch), src.name,
                            exc, delay)
                self._sleep(delay, stop)
                return False
        self._handler_failures = 0
        self._plain_next = False
        self._commit(src, batch, t_batch)
        return True

    def _pipelined(self, src: Source, batch: Batch) -> None:
        """prepare here, durable on the writer; then settle until one batch at most is in flight."""
        assert self._writer is not None
        t_batch = time.monotonic()
        try:
            prepared = self.handler.prepare(batch)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - any trouble: redo it the plain way, after what is in flight
            rewind(src.consumer, batch.records)  # before settling: an older batch may rewind further
            self._plain_next = True
            self.settle()
            return
        self._inflight.append(_InFlight(src, batch, prepared.letters,
                                        self._writer.submit(self._run_durable, prepared.durable), t_batch))
        self.settle(keep=1)

    def _run_durable(self, durable: Callable[[], None]) -> None:
        if self._broken:
            raise _Skipped()
        try:
            durable()
        except BaseException:
            self._broken = True
            raise

    def settle(self, keep: int = 0) -> None:
        """Finish batches in flight (oldest first: letters, then offsets) until `keep` remain. A
        durable part that failed rewinds every batch in flight; the next one is handled plainly."""
        while len(self._inflight) > keep:
            head = self._inflight[0]
            try:
                head.done.result()
            except Exception as exc:  # noqa: BLE001 - redone the plain way, which says what it is
                log.warning("%s: batch of %d from %s failed on its way to durable (%r); redoing it", self.name,
                            len(head.batch), head.source.name, exc)
                for f in self._inflight:  # nothing after the failure was made durable (_Skipped)
                    try:
                        f.done.result()
                    except Exception:  # noqa: BLE001 - the failure itself, or skipped
                        pass
                for f in reversed(self._inflight):  # newest first: the oldest batch's seek wins
                    rewind(f.source.consumer, f.batch.records)
                self._inflight.clear()
                self._broken = False
                self._plain_next = True
                self.stats.retries += 1
                return
            self._inflight.popleft()
            self._send_letters(head.letters, head.source.name)
            self._commit(head.source, head.batch, head.started)

    def _commit(self, src: Source, batch: Batch, started: float) -> None:
        """The batch is durable and its letters sent: commit its offsets (raises a retriable
        KafkaError after rewinding, when the broker is away)."""
        crash_point(f"{self.name}.before_commit")  # state durable, offsets not yet committed
        if src.group is not None:
            try:
                commit(src.consumer, next_offsets(batch.records))
            except KafkaError as exc:
                if exc.retriable:  # redelivered, found done (idempotent), committed then
                    rewind(src.consumer, batch.records)
                    raise
                if not isinstance(exc, RebalancedError):
                    raise
                log.info("%s: commit after a rebalance dropped (%s); the new owner redoes it", self.name, exc)
        self.stats.batches += 1
        self.stats.records += len(batch)
        self.stats.busy_seconds += time.monotonic() - started

    def _handle(self, batch: Batch) -> list[Letter]:
        """The handler on the batch; a non-retriable failure is looked for record by record."""
        try:
            return list(self.handler.handle(batch))
        except XdcError as exc:
            if exc.retriable:
                raise
            err: BaseException = exc
        except Exception as exc:  # noqa: BLE001 - a bug on one message must not stop the partition
            err = exc
        if len(batch) == 1:
            rec = batch.records[0]
            log.warning("%s: %s[%d]@%d cannot be handled: %r", self.name, rec.topic, rec.partition, rec.offset, err)
            return [Letter(rec, _reason(err), str(err)[:1000] or repr(err))]
        letters: list[Letter] = []
        for rec in batch.records:
            letters.extend(self._handle(Batch(batch.source, [rec])))
        return letters

    def _send_letters(self, letters: Sequence[Letter], origin: str) -> None:
        if not letters:
            return
        if self.dead_letters is None:
            raise XdcError(f"{self.name}: {len(letters)} records cannot be handled and there is no dead-letter topic: "
                           + "; ".join(f"{x.reason}: {x.detail[:100]}" for x in letters[:3]))
        for x in letters:
            self.dead_letters.send(x.record, x.reason, x.detail, origin_dc=origin)
            self.stats.letters_by_reason[x.reason] = self.stats.letters_by_reason.get(x.reason, 0) + 1
        self.dead_letters.flush()  # durable before the offsets that skip them are committed
        self.stats.dead_letters += len(letters)

    def _broker_trouble(self, failures: int, exc: KafkaError) -> int:
        if not exc.retriable:
            raise exc  # e.g. authentication or authorization: waiting will not help
        failures += 1
        if failures > self.broker_retry.max_attempts:
            raise exc
        delay = self.broker_retry.delay(failures)
        log.warning("%s: %s; retry %d/%d in %.1fs", self.name, exc, failures, self.broker_retry.max_attempts, delay)
        time.sleep(delay)
        return failures

    def _caught_up(self) -> bool:
        try:
            with kafka_errors("positions"):
                return all(caught_up(s.consumer) for s in self.sources)
        except KafkaError:
            return False

    @staticmethod
    def _sleep(seconds: float, stop: threading.Event | None) -> None:
        if stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)


def _reason(exc: BaseException) -> str:
    """A dead letter's reason: the error's own, or its class in snake case (NotReadyError -> not_ready)."""
    if isinstance(exc, ReasonedError):
        return exc.reason
    if not isinstance(exc, XdcError):
        return "unexpected_error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__.removesuffix("Error")).lower() or "error"
