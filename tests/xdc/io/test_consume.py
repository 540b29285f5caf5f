"""The one consume loop on a real broker: poison records, retriable failures, commits after the work;
and its pipelined mode: a batch's durable part overlaps the next batch's preparation, offsets are
committed only after their batch is durable, in batch order, and a durable part that fails is redone
(plainly) without losing a record or committing past it.

The handlers here are recorders (pure logic); Kafka, the consumer group and its commits are real."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import xdc.io.consume as consume_mod
from mirror.dlq import read_letters
from tests.support import end_offsets, produce, site
from xdc.config import XdcConfig
from xdc.errors import EventError, RebalancedError, TransientStateError, TransientStoreError
from xdc.io.consume import Batch, ConsumeLoop, Letter, Prepared, Source
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import TopicPartition, group_offsets, make_admin
from xdc.io.offset_gaps import OffsetGap
from xdc.retry import RetryPolicy


class Recorder:
    """Remembers what it handled; raises what `fail` says for a record value."""

    def __init__(self, fail: dict[bytes, list[BaseException]] | None = None) -> None:
        self.fail = fail or {}
        self.done: list[bytes] = []
        self.batches = 0

    def handle(self, batch: Batch) -> Sequence[Letter]:
        self.batches += 1
        for r in batch.records:
            left = self.fail.get(r.value)
            if left:
                raise left.pop(0)
        self.done.extend(r.value for r in batch.records)
        return []


def _loop(cfg: XdcConfig, group: str, handler: Recorder, **kw: object) -> ConsumeLoop:
    a = site(cfg, "A")
    sink = DeadLetterSink(a.producer, a.topics.dead_letter, incidents=a.state.incidents)
    return ConsumeLoop([Source("A", a.consumer(group), group, (a.topics.events,))], handler, dead_letters=sink,
                       poll_timeout_s=0.3, **kw)  # type: ignore[arg-type]


def test_a_poison_record_is_dead_lettered_alone_and_the_rest_is_committed(xcfg: XdcConfig, tag: str) -> None:
    values = [f"m{i}".encode() for i in range(20)]
    produce(xcfg, "A", xcfg.dc("A").kafka.topics.events, [(b"k", v) for v in values])  # one partition, in order
    handler = Recorder({b"m7": [ValueError("a bug on this message")] * 50,
                        b"m12": [EventError("bad_shape", "not ours")] * 50})
    loop = _loop(xcfg, f"{tag}-g", handler, max_records=500)
    try:
        stats = loop.run(once=True)
    finally:
        loop.close()
    assert handler.done == [v for v in values if v not in (b"m7", b"m12")]  # the rest, in order
    assert stats.dead_letters == 2 and stats.letters_by_reason == {"unexpected_error": 1, "bad_shape": 1}
    letters = {d.value: d for d in read_letters(site(xcfg, "A"))}
    assert set(letters) == {b"m7", b"m12"} and letters[b"m12"].reason == "bad_shape"
    assert "a bug on this message" in letters[b"m7"].detail
    committed = group_offsets(site(xcfg, "A").brokers, f"{tag}-g")
    assert sum(committed.values()) == 20  # every record handled or dead-lettered: committed past all


def test_a_retriable_failure_is_retried_then_applied_once(xcfg: XdcConfig, tag: str) -> None:
    produce(xcfg, "A", xcfg.dc("A").kafka.topics.events, [(b"k", b"a"), (b"k", b"b")])
    handler = Recorder({b"b": [TransientStoreError("503 SlowDown"), TransientStoreError("reset")]})
    loop = _loop(xcfg, f"{tag}-g", handler, retry=RetryPolicy(max_attempts=0, base_s=0.01, cap_s=0.05))
    try:
        stats = loop.run(once=True)
    finally:
        loop.close()
    assert stats.retries == 2 and stats.dead_letters == 0
    assert handler.batches == 3 and handler.done == [b"a", b"b"]  # redelivered whole, applied once


def test_retries_are_bounded_when_asked_and_the_batch_goes_to_the_dead_letters(xcfg: XdcConfig, tag: str) -> None:
    produce(xcfg, "A", xcfg.dc("A").kafka.topics.events, [(b"k", b"x")])
    handler = Recorder({b"x": [TransientStoreError("still down")] * 10})
    loop = _loop(xcfg, f"{tag}-g", handler, retry=RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.05))
    try:
        stats = loop.run(once=True)
    finally:
        loop.close()
    assert handler.done == [] and stats.retries == 2
    (letter,) = read_letters(site(xcfg, "A"))
    assert letter.value == b"x" and letter.reason == "transient_store_after_retries"
    assert sum(group_offsets(site(xcfg, "A").brokers, f"{tag}-g").values()) == 1


class PipelinedRecorder:
    """Prepares on the loop's thread, makes durable (slowly) on the writer's; fails once if asked."""

    def __init__(self, fail_durable_at: int | None = None, durable_s: float = 0.03) -> None:
        self.fail_at = fail_durable_at
        self.durable_s = durable_s
        self.durable: dict[int, int] = {}  # partition -> next offset made durable
        self.applied: list[tuple[int, int]] = []
        self.events: list[tuple[str, int, float, float]] = []  # (what, batch number, start, end)
        self.batches = 0
        self.lock = threading.Lock()

    def prepare(self, batch: Batch) -> Prepared:
        n = self.batches = self.batches + 1
        t = time.monotonic()
        records = [(r.partition, r.offset) for r in batch.records]
        self.events.append(("prepare", n, t, time.monotonic()))

        def durable() -> None:
            t0 = time.monotonic()
            if self.fail_at == n:
                self.fail_at = None
                raise TransientStateError("state away for a moment")
            time.sleep(self.durable_s)
            with self.lock:
                self.applied.extend(records)
                for p, o in records:
                    self.durable[p] = max(self.durable.get(p, 0), o + 1)
            self.events.append(("durable", n, t0, time.monotonic()))

        return Prepared([], durable)

    def handle(self, batch: Batch) -> list[Letter]:
        p = self.prepare(batch)
        p.durable()
        return p.letters


def _pipelined_loop(cfg: XdcConfig, handler: Any, group: str) -> ConsumeLoop:
    a = site(cfg, "A")
    topic = a.topics.events
    return ConsumeLoop([Source("A", a.consumer(group), group, (topic,))], handler, max_records=15,
                       poll_timeout_s=0.2, name="test")


def _watch_commits(monkeypatch: pytest.MonkeyPatch, durable: Callable[[], dict[int, int]]) -> list[dict[int, int]]:
    """Every commit the loop makes is checked against what was durable at that moment."""
    seen: list[dict[int, int]] = []
    real = consume_mod.commit

    def checked(consumer: Any, offsets: dict[TopicPartition, int]) -> None:
        now = durable()
        for tp, off in offsets.items():
            assert off <= now.get(tp.partition, 0), f"commit {tp}={off} ahead of durable {now.get(tp.partition)}"
        seen.append({tp.partition: off for tp, off in offsets.items()})
        real(consumer, offsets)

    monkeypatch.setattr(consume_mod, "commit", checked)
    return seen


def _produce(cfg: XdcConfig, n: int) -> None:
    produce(cfg, "A", cfg.dc("A").kafka.topics.events, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(n)])


def test_durable_parts_overlap_the_next_batch_and_commits_follow_them(
        xcfg: XdcConfig, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _produce(xcfg, 200)
    rec = PipelinedRecorder()
    commits = _watch_commits(monkeypatch, lambda: dict(rec.durable))
    loop = _pipelined_loop(xcfg, rec, f"{tag}-pipe")
    try:
        loop.run(once=True)
    finally:
        loop.close()
    ends = end_offsets(xcfg, "A", xcfg.dc("A").kafka.topics.events)
    assert sorted(rec.applied) == sorted({(p, o) for (_, p), end in ends.items() for o in range(end)})
    assert commits and loop.stats.records == 200
    # overlap: some batch was prepared while the one before it was being made durable
    durable = {n: (t0, t1) for what, n, t0, t1 in rec.events if what == "durable"}
    prepared = {n: t0 for what, n, t0, _ in rec.events if what == "prepare"}
    assert any(n - 1 in durable and durable[n - 1][0] < t < durable[n - 1][1] for n, t in prepared.items())
    # durable parts ran one at a time, in batch order
    spans = sorted(durable.values())
    assert [n for n, _ in sorted(durable.items(), key=lambda kv: kv[1])] == sorted(durable)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_a_failed_durable_part_is_redone_and_nothing_is_committed_past_it(
        xcfg: XdcConfig, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _produce(xcfg, 200)
    rec = PipelinedRecorder(fail_durable_at=3)
    _watch_commits(monkeypatch, lambda: dict(rec.durable))
    loop = _pipelined_loop(xcfg, rec, f"{tag}-fail")
    try:
        loop.run(once=True)
    finally:
        loop.close()
    ends = end_offsets(xcfg, "A", xcfg.dc("A").kafka.topics.events)
    every = {(p, o) for (_, p), end in ends.items() for o in range(end)}
    assert set(rec.applied) == every  # nothing lost (some records twice: redone after the failure)
    assert loop.stats.retries == 1 and rec.fail_at is None
    assert rec.durable == {p: end for (_, p), end in ends.items()}


class Stalling(PipelinedRecorder):
    """Its first durable part outlives max.poll.interval.ms: the loop waits for it without polling,
    so the group drops the member meanwhile and refuses that batch's commit."""

    def __init__(self, stall_s: float) -> None:
        super().__init__()
        self.stall_s = stall_s

    def prepare(self, batch: Batch) -> Prepared:
        p = super().prepare(batch)
        if self.batches > 1:
            return p

        def durable() -> None:
            time.sleep(self.stall_s)
            p.durable()

        return Prepared(p.letters, durable)


def _all_committed(cfg: XdcConfig, group: str, rec: PipelinedRecorder) -> None:
    a = site(cfg, "A")
    ends = {tp: end for tp, end in end_offsets(cfg, "A", a.topics.events).items() if end > 0}
    committed = {(tp.topic, tp.partition): off for tp, off in group_offsets(a.brokers, group).items()}
    assert committed == ends
    assert rec.durable == {p: end for (_, p), end in ends.items()}


def test_a_member_dropped_by_the_group_ends_its_once_run_committed(xcfg: XdcConfig, tag: str) -> None:
    """A real refusal: the loop waits on a durable part past max.poll.interval.ms, the group drops
    the member, its commit is refused; it rejoins, redoes the batch (found done) and commits."""
    _produce(xcfg, 20)
    a = site(xcfg, "A")
    group, rec = f"{tag}-stall", Stalling(stall_s=4.0)
    consumer = a.consumer(group, max_poll_interval_ms=1500)
    loop = ConsumeLoop([Source("A", consumer, group, (a.topics.events,))], rec, poll_timeout_s=0.2, name="test")
    try:
        loop.run(once=True)
    finally:
        loop.close()
    assert loop.stats.refused_commits >= 1  # the window was hit
    _all_committed(xcfg, group, rec)


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "plain"])
def test_a_refused_commit_on_partitions_kept_is_redone_before_once_ends(
        xcfg: XdcConfig, tag: str, monkeypatch: pytest.MonkeyPatch, pipeline: bool) -> None:
    """The window a rebalance that leaves the partitions here opens (kafka-python 3 then keeps their
    positions past the refused batch): the broker's refusal is injected at the loop's first commit,
    the group itself does not move. Without the seek back, `once` ends with nothing committed and
    the next run redoes the batch (seen in CI under load)."""
    _produce(xcfg, 20)
    real, refused = consume_mod.commit, []

    def refuse_first(consumer: Any, offsets: dict[TopicPartition, int]) -> None:
        if not refused:
            refused.append(offsets)
            raise RebalancedError("commit offsets: RebalanceInProgressError (injected)")
        real(consumer, offsets)

    monkeypatch.setattr(consume_mod, "commit", refuse_first)
    a = site(xcfg, "A")
    group, rec = f"{tag}-kept-{pipeline}", PipelinedRecorder()
    loop = ConsumeLoop([Source("A", a.consumer(group), group, (a.topics.events,))], rec, poll_timeout_s=0.2,
                       name="test", pipeline=pipeline)
    try:
        loop.run(once=True)
    finally:
        loop.close()
    assert refused and loop.stats.refused_commits == 1
    _all_committed(xcfg, group, rec)


def test_a_member_whose_commits_stay_refused_leaves_and_joins_again(
        xcfg: XdcConfig, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member the group dropped without the client noticing (kafka-python 3.0.12 under load): it
    fetches, and every commit is refused for as long as it keeps its member id. The loop must
    leave and join afresh, then commit; without that, `once` never ends (bounded here at 60 s)."""
    _produce(xcfg, 20)
    a = site(xcfg, "A")
    group, rec = f"{tag}-zombie", PipelinedRecorder()
    consumer = a.consumer(group)
    real, dropped_member, accepted = consume_mod.commit, [], set()

    def refused_while_the_same_member(c: Any, offsets: dict[TopicPartition, int]) -> None:
        member = c.group_metadata().member_id
        if not dropped_member:
            dropped_member.append(member)
        if member == dropped_member[0]:
            raise RebalancedError("commit offsets: UnknownMemberIdError (injected: a dropped member)")
        real(c, offsets)
        accepted.add(member)

    monkeypatch.setattr(consume_mod, "commit", refused_while_the_same_member)
    loop = ConsumeLoop([Source("A", consumer, group, (a.topics.events,))], rec, poll_timeout_s=0.2, name="test")
    try:
        loop.run(once=True, max_seconds=60)
    finally:
        loop.close()
    assert loop.stats.refused_commits == 2  # the second refusal in a row made it rejoin
    assert accepted and dropped_member[0] not in accepted  # committed as a new member
    _all_committed(xcfg, group, rec)


class GapRecorder(Recorder):
    """A handler with `on_gaps`: its first call fails when asked (the state away), as a real one may."""

    def __init__(self, fail_first_gap: bool = False) -> None:
        super().__init__()
        self.log: list[object] = []
        self.fail_first_gap = fail_first_gap

    def handle(self, batch: Batch) -> Sequence[Letter]:
        self.log.extend((r.partition, r.value) for r in batch.records)
        return super().handle(batch)

    def on_gaps(self, source: str, gaps: list[OffsetGap]) -> None:
        if self.fail_first_gap:
            self.fail_first_gap = False
            self.log.append("gap_failed")
            raise TransientStateError("state database away")
        self.log.extend(gaps)


def test_records_deleted_before_the_group_read_them_are_a_gap_found_before_consuming(
        xcfg: XdcConfig, tag: str) -> None:
    """DeleteRecords (the broker mechanism retention uses) moves a partition's log start past what
    the group committed: the loop hands the gap to the handler before any record of that partition,
    retries the check while the handler fails, acknowledges it, and a restart finds no gap again.
    A group with no offset on that partition has a gap of the whole deleted prefix; on the
    partitions whose log still starts at 0 it has none."""
    topic = xcfg.dc("A").kafka.topics.events
    produce(xcfg, "A", topic, [(b"k", f"m{i}".encode()) for i in range(10)])  # one partition
    first = GapRecorder()
    loop = _loop(xcfg, f"{tag}-g", first)
    try:
        loop.run(once=True)
    finally:
        loop.close()
    assert first.done == [f"m{i}".encode() for i in range(10)] and loop.gaps == []
    part = first.log[0][0]  # type: ignore[index]
    tp = TopicPartition(topic, part)
    assert group_offsets(site(xcfg, "A").brokers, f"{tag}-g")[tp] == 10

    produce(xcfg, "A", topic, [(b"k", f"m{i}".encode()) for i in range(10, 20)])
    admin = make_admin(site(xcfg, "A").brokers)
    try:
        admin.delete_records({tp: 15})  # m10..m14 gone before the group read them
    finally:
        admin.close()

    again = GapRecorder(fail_first_gap=True)
    loop = _loop(xcfg, f"{tag}-g", again)
    try:
        loop.run(once=True)
    finally:
        loop.close()
    gap = OffsetGap(topic, part, 10, 15, 20, 5)
    assert again.log == ["gap_failed", gap] + [(part, f"m{i}".encode()) for i in range(15, 20)]
    assert loop.gaps == [gap]
    assert group_offsets(site(xcfg, "A").brokers, f"{tag}-g")[tp] == 20

    fresh = GapRecorder()  # a new group: no offsets anywhere
    loop = _loop(xcfg, f"{tag}-new", fresh)
    try:
        loop.run(once=True)
    finally:
        loop.close()
    assert fresh.log[0] == OffsetGap(topic, part, None, 15, 20, 15)
    assert fresh.done == [f"m{i}".encode() for i in range(15, 20)] and loop.gaps == [fresh.log[0]]

    restarted = GapRecorder()
    loop = _loop(xcfg, f"{tag}-g", restarted)
    try:
        loop.run(once=True)
    finally:
        loop.close()
    assert loop.gaps == [] and restarted.log == []
