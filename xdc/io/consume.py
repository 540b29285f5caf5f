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
  with `retry.max_attempts` set, a batch that failed that often is dead-lettered with the reason
  (tries are counted per batch, by its first record); the handler's `on_letters` hears of every
  letter once it is flushed, before the commit;
- a fatal error (`XdcError.fatal`: a misconfiguration such as an untrusted TLS certificate) ends
  the loop at once, nothing dead-lettered or committed;
- any other error is a poison message somewhere in the batch: the records are handled one by one
  and the one that fails is dead-lettered with the reason (`ReasonedError.reason`, else
  `unexpected_error`), while the rest proceeds;
- a retriable broker error is retried with backoff (a restarted broker is waited for, up to
  `max_broker_failures` in a row); a commit refused after a rebalance seeks back to the batch
  (redone here, found done, and committed; or by the partitions' new owner), and a second refusal
  in a row makes the member leave and join again (kafka-python can stay a member the group
  dropped); before partitions are revoked the handler's `on_revoked` runs;
- a source without a group (`Source.group is None`) is read from positions set by the caller and
  commits nothing (dead-letter listing, the lag reader);
- about once a second the log ends are probed (one ListOffsets call); once every partition's position
  has passed a probe's ends, every record appended before that probe was handled: `applied_through`
  (wall-clock seconds, per source) moves to the probe's time, and the handler's
  `on_applied_through` hears of it. While a source cannot be reached no probe succeeds, so
  now - applied_through bounds the lag of everything still pending and keeps growing; a batch in
  flight (below) counts as not handled yet;
- before a newly assigned partition is read, its committed offset is compared with the log's start
  and end (`xdc.io.offset_gaps`: the rule): when the group will never see some of its records
  (retention removed them unread, or the group has no offset and the log no longer starts at 0),
  the handler's `on_gaps(source, gaps)` records them (durably, before it returns), then the log
  start is committed for those partitions, so a restart does not find the same gap again. The
  check is a broker round trip, so it does not run in the rebalance listener (kafka-python calls
  it on its event loop, where a blocking call would stall heartbeats): the listener only forgets
  revoked partitions, and the loop checks a partition it has not checked since it was assigned
  before handling its first batch, and when idle (a log that retention emptied brings no batch).
  A check that fails (broker away, state down) rewinds that batch and is tried again.

Pipelined handlers (the mirror) split a batch in two: `prepare` (parse, decide, copy: CPU and
object I/O) on the loop's thread, and the `durable` part it returns (the state transaction, the
outbox) on one writer thread, in batch order. The loop prepares batch N+1 while N is made durable,
and commits N's offsets once N's durable part is done: the same order of guarantees, with the
database's time overlapped. A durable part that fails stops the writer (later batches are not made
durable), every batch in flight is rewound, and the batch redelivered next is handled the plain
way (with the retries, backoff and poison-record search above) before pipelining resumes.

Threads: every consumer call (poll, seek, commit, offsets, the gap check) is made on the loop's
thread; kafka-python's consumer is not thread-safe. The writer thread only runs durable parts
(state and producer, never the consumer), and `on_gaps` runs with nothing in flight. kafka-python
3.0.12 runs rebalance listeners on the consumer's IO thread (a join that outlives a poll() goes on
there while the loop's thread runs): there a blocking consumer call would fail, and anything that
blocks stalls heartbeats and the join, so the listener only forgets the revoked partitions' gap checks
(and calls the handler's hook, which must not block either). A batch in flight when its partitions
are revoked is finished by the loop: its commit is refused after the rebalance, and whoever owns
the partitions next (this loop, or another member) redoes it, found done (the state's upsert guard
and the outbox's per-key claims make a batch applied by two processes at once safe: each row once,
each applied event published once).
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
from kafka.errors import KafkaError as _ClientError

from xdc.errors import KafkaError, ReasonedError, RebalancedError, XdcError
from xdc.faults import crash_point
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import (
    Record,
    commit,
    kafka_errors,
    next_offsets,
    rewind,
    to_records,
)
from xdc.io.offset_gaps import OffsetGap, find_gaps
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
    """Optional hooks, called when defined: `on_letters(source, letters)` once letters are flushed,
    `on_applied_through(source, t)`, `on_idle()`, `on_revoked(source, partitions)` (in the rebalance
    listener: no consumer call), `on_assigned(source, partitions, consumer)` (likewise),
    `on_gaps(source, gaps)` (records them durably; the partitions are read on once it returns)."""

    def handle(self, batch: Batch) -> Sequence[Letter]:
        """Do the batch's work durably; return the records to dead-letter."""
        ...


@dataclass(frozen=True)
class _Probe:
    at: float  # wall-clock time just before the log ends were asked for
    ends: dict[TopicPartition, int]


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
    refused_commits: int = 0  # refused after a rebalance: redone
    seconds: float = 0.0
    busy_seconds: float = 0.0  # time in the handler (not waiting for records)
    letters_by_reason: dict[str, int] = field(default_factory=dict)


class _Revocations(ConsumerRebalanceListener):
    def __init__(self, loop: ConsumeLoop, source: Source) -> None:
        self.loop, self.source = loop, source

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # On kafka-python's IO thread: no consumer call and nothing that blocks here (heartbeats and
        # the join wait on this thread). A batch in flight is finished and committed by the loop
        # (refused after the rebalance: whoever owns the partition next redoes it; the state's
        # guards make that safe).
        with self.loop._gap_lock:  # checked again when next assigned (the committed offset may move meanwhile)
            self.loop._checked.get(self.source.name, set()).difference_update(revoked)
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
                 max_broker_failures: int = 30, name: str = "consume", pipeline: bool = True,
                 probe_interval_s: float = 1.0) -> None:
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
        self._refused: dict[str, int] = {}  # source -> commits refused in a row
        self._failures: dict[tuple[str, str, int, int], int] = {}  # a batch (by its first record) -> failed tries
        self.probe_interval_s = probe_interval_s
        self.applied_through: dict[str, float] = {}  # source -> every record appended before it is handled
        self._probes: dict[str, list[_Probe]] = {}
        self._last_probe: dict[str, float] = {}
        # source -> partitions checked for gaps since they were assigned; the rebalance listener runs
        # on kafka-python's IO thread and removes revoked ones, hence the lock
        self._checked: dict[str, set[TopicPartition]] = {}
        self._gap_lock = threading.Lock()
        self.gaps: list[OffsetGap] = []  # every gap found, for the caller's report
        for s in self.sources:
            if s.group is not None and s.topics:
                with kafka_errors(f"subscribe {s.name} {list(s.topics)}"):
                    # Topic metadata first: a group joined before it is known gets an empty first
                    # assignment and rejoins at once; kafka-python 3.0.12 sometimes stops
                    # heartbeating after that second join and never notices it was dropped.
                    for t in s.topics:
                        s.consumer.partitions_for_topic(t)
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
                        if not self._gaps_checked(src, batch, stop):
                            continue
                        if self._writer is not None and not self._plain_next:
                            self._pipelined(src, batch)
                        elif not self._plain(src, batch, stop):
                            continue
                    except KafkaError as exc:  # the commit: a broker error worth waiting for
                        broker_failures = self._broker_trouble(broker_failures, exc)
                        continue
                    broker_failures = 0
                    progressed = True
                    self._track(src, idle=False)
                if progressed:
                    idle = 0
                    continue
                try:
                    self.settle()  # idle: what is in flight becomes durable and committed now
                except KafkaError as exc:
                    broker_failures = self._broker_trouble(broker_failures, exc)
                    continue
                for src in self.sources:  # nothing in flight: a log that retention emptied brings no batch
                    try:
                        self._check_gaps(src, set(src.consumer.assignment()))
                    except XdcError as exc:
                        if not exc.retriable:
                            raise
                        log.warning("%s: gap check of %s failed (%r); tried again", self.name, src.name, exc)
                on_idle = getattr(self.handler, "on_idle", None)
                if on_idle is not None:
                    on_idle()
                self.caught_up = all([self._track(s, idle=True) for s in self.sources])
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
            tries = self._failed(batch)
            if self.retry.max_attempts and tries >= self.retry.max_attempts:
                log.error("%s: batch failed %d times (%s): dead-lettering it", self.name, tries, exc)
                self._send_letters([Letter(r, f"{_reason(exc)}_after_retries", str(exc)) for r in batch.records],
                                   src.name)
            else:
                self._retry_later(src, batch, exc, tries, stop)
                return False
        self._failures.pop(_ident(batch), None)
        self._plain_next = False
        if not self._commit(src, batch, t_batch):
            rewind(src.consumer, batch.records)
            return False
        return True

    def _failed(self, batch: Batch) -> int:
        """One more failed try of `batch` (counted by its first record); returns the tries."""
        ident = _ident(batch)
        tries = self._failures[ident] = self._failures.get(ident, 0) + 1
        return tries

    def _retry_later(self, src: Source, batch: Batch, exc: BaseException, tries: int,
                     stop: threading.Event | None) -> None:
        rewind(src.consumer, batch.records)
        self.stats.retries += 1
        delay = self.retry.delay(tries)
        log.warning("%s: batch of %d from %s failed (%s); retry in %.1fs", self.name, len(batch), src.name, exc, delay)
        self._sleep(delay, stop)

    def _gaps_checked(self, src: Source, batch: Batch, stop: threading.Event | None) -> bool:
        """The gap check of the batch's partitions not checked since their assignment; False when it
        failed (broker or state away): the batch is rewound and tried again after a backoff."""
        try:
            self._check_gaps(src, {TopicPartition(r.topic, r.partition) for r in batch.records})
        except XdcError as exc:
            if not exc.retriable:
                raise
            self._retry_later(src, batch, exc, self._failed(batch), stop)
            return False
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
                self._rewind_inflight()  # nothing after the failure was made durable (_Skipped)
                self._plain_next = True
                self.stats.retries += 1
                return
            self._inflight.popleft()
            self._send_letters(head.letters, head.source.name)
            if not self._commit(head.source, head.batch, head.started):
                self._inflight.appendleft(head)
                self._rewind_inflight()
                return

    def _rewind_inflight(self) -> None:
        """Wait for the durable parts in flight, then seek back to the first record of the oldest
        batch in flight: all of them are delivered again (redone, found done where durable)."""
        for f in self._inflight:
            try:
                f.done.result()
            except Exception:  # noqa: BLE001 - a failure, or skipped after one: redone anyway
                pass
        for f in reversed(self._inflight):  # newest first: the oldest batch's seek wins
            rewind(f.source.consumer, f.batch.records)
        self._inflight.clear()
        self._broken = False

    def _commit(self, src: Source, batch: Batch, started: float) -> bool:
        """The batch is durable and its letters sent: commit its offsets (raises a retriable
        KafkaError after rewinding, when the broker is away). False when the commit was refused
        after a rebalance: the caller seeks back (below) and the batch is redone, found done.

        Why seek back: kafka-python 3 keeps a partition's position across a rebalance that leaves
        the partition here, so without it these records would stay uncommitted until a later batch
        of the partition commits past them; at the end of a `once` run there is none (the next run
        redid them). A partition moved away is not sought: its new owner starts at the committed
        offset."""
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
                log.info("%s: commit after a rebalance refused (%s); the batch is redone, found done", self.name, exc)
                self.stats.refused_commits += 1
                refused = self._refused[src.name] = self._refused.get(src.name, 0) + 1
                if refused >= 2:
                    self._rejoin(src)
                return False
            self._refused[src.name] = 0
        self.stats.batches += 1
        self.stats.records += len(batch)
        self.stats.busy_seconds += time.monotonic() - started
        return True

    def _rejoin(self, src: Source) -> None:
        """Commits refused twice in a row: this member is not rejoining by itself. kafka-python
        3.0.12 can go on as a member the group dropped (seen in CI under load: it fetches, every
        commit is refused, LeaveGroup at close answers UNKNOWN_MEMBER_ID). Leave and join afresh:
        the new assignment reads from the committed offsets."""
        log.warning("%s: commits to %s refused twice in a row; leaving the group and joining again", self.name,
                    src.name)
        self._refused[src.name] = 0
        if not src.topics:  # partitions assigned by hand: no group membership to renew
            return
        with kafka_errors(f"rejoin {src.name}"):
            src.consumer.unsubscribe()
            src.consumer.subscribe(list(src.topics), listener=_Revocations(self, src))
        with self._gap_lock:  # a fresh assignment: checked again
            self._checked.pop(src.name, None)

    def _handle(self, batch: Batch) -> list[Letter]:
        """The handler on the batch; a non-retriable failure is looked for record by record."""
        try:
            return list(self.handler.handle(batch))
        except XdcError as exc:
            if exc.retriable or exc.fatal:  # fatal: a misconfiguration, no record is at fault
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
        hook = getattr(self.handler, "on_letters", None)
        if hook is not None:
            hook(origin, list(letters))

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

    def _check_gaps(self, src: Source, parts: set[TopicPartition]) -> None:
        """Compare the committed offsets of those of `parts` not checked since their assignment with
        their logs; hand the gaps to the handler (durably recorded when it returns) and acknowledge
        them (commit the log start). Raises a retriable XdcError when the broker or state is away.
        On the loop's thread; the handler hears of gaps with nothing in flight (one state writer)."""
        if getattr(self.handler, "on_gaps", None) is None or src.group is None:
            return
        with self._gap_lock:
            todo = sorted(parts - self._checked.get(src.name, set()))
        if not todo:
            return
        consumer = src.consumer
        with kafka_errors(f"offsets of {src.name} {todo}"):
            starts = consumer.beginning_offsets(todo, timeout_ms=10_000)
            ends = consumer.end_offsets(todo, timeout_ms=10_000)
            committed = {tp: consumer.committed(tp, timeout_ms=10_000) for tp in todo}
        gaps = find_gaps({(tp.topic, tp.partition): c for tp, c in committed.items()},
                         {(tp.topic, tp.partition): s for tp, s in starts.items()},
                         {(tp.topic, tp.partition): e for tp, e in ends.items()})
        if gaps:
            for g in gaps:
                log.warning("%s: offset gap on %s[%d] for group %s: committed %s, log start %d (%s offsets lost)",
                            self.name, g.topic, g.partition, src.group, g.committed, g.log_start,
                            "unknown" if g.lost is None else g.lost)
            self.settle()  # the handler records them with no durable part running beside it
            self.handler.on_gaps(src.name, gaps)  # type: ignore[attr-defined]
            self.gaps.extend(gaps)
            try:  # acknowledged: a restart no longer finds them (the handler's record re-drives repairs)
                commit(consumer, {TopicPartition(g.topic, g.partition): g.resume_at for g in gaps})
            except KafkaError as exc:  # found again after the next assignment; the handler dedupes
                log.warning("%s: gaps recorded but not acknowledged in the group (%s)", self.name, exc)
        with self._gap_lock:
            self._checked.setdefault(src.name, set()).update(tp for tp in todo if tp in consumer.assignment())

    def _track(self, src: Source, *, idle: bool) -> bool:
        """Probe the log ends (when idle, or once per probe interval) and move `applied_through`
        past every probe the positions have reached. True when every assigned partition is at the
        end of a probe made now (caught up); False when that is not known. A batch in flight counts
        as not handled: its partitions' positions are taken at its first record."""
        consumer = src.consumer
        parts = list(consumer.assignment())
        if not parts:
            return False
        probes = self._probes.setdefault(src.name, [])
        fresh = None
        now = time.time()
        if idle or now - self._last_probe.get(src.name, 0.0) >= self.probe_interval_s:
            self._last_probe[src.name] = now
            try:
                ends = consumer.end_offsets(parts, timeout_ms=2000)
            except _ClientError as exc:  # the broker away: no probe, applied_through stays behind
                log.debug("%s: log ends of %s: %r", self.name, src.name, exc)
            else:
                fresh = _Probe(now, dict(ends))
                probes.append(fresh)
                del probes[:-64]  # a long stall: the newest probes are the ones that matter
        if not probes:
            return False
        try:
            pos = {tp: consumer.position(tp, timeout_ms=1000) for tp in parts}
        except _ClientError as exc:
            log.debug("%s: positions of %s: %r", self.name, src.name, exc)
            return False
        for f in self._inflight:  # not durable yet
            if f.source is src:
                for r in f.batch.records:
                    tp = TopicPartition(r.topic, r.partition)
                    if tp in pos and pos[tp] is not None and r.offset < pos[tp]:
                        pos[tp] = r.offset
        passed: _Probe | None = None
        keep = []
        for p in probes:
            if not set(p.ends) <= set(parts):
                continue  # partitions moved to another member: that probe can no longer be passed here
            if all(pos.get(tp) is not None and pos[tp] >= end for tp, end in p.ends.items()):  # type: ignore[operator]
                passed = p
            else:
                keep.append(p)
        probes[:] = keep
        if passed is not None and passed.at > self.applied_through.get(src.name, 0.0):
            self.applied_through[src.name] = passed.at
            hook = getattr(self.handler, "on_applied_through", None)
            if hook is not None:
                hook(src.name, passed.at)
        return fresh is not None and passed is fresh

    @staticmethod
    def _sleep(seconds: float, stop: threading.Event | None) -> None:
        if stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)


def _ident(batch: Batch) -> tuple[str, str, int, int]:
    r = batch.records[0]
    return (batch.source, r.topic, r.partition, r.offset)


def _reason(exc: BaseException) -> str:
    """A dead letter's reason: the error's own, or its class in snake case (NotReadyError -> not_ready)."""
    if isinstance(exc, ReasonedError):
        return exc.reason
    if not isinstance(exc, XdcError):
        return "unexpected_error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__.removesuffix("Error")).lower() or "error"
