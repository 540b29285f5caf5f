"""The one consume loop on a real broker: poison records, retriable failures, commits after the work."""
from __future__ import annotations

from collections.abc import Sequence

from mirror.dlq import read_letters
from tests.support import produce, site
from xdc.config import XdcConfig
from xdc.errors import EventError, TransientStoreError
from xdc.io.consume import Batch, ConsumeLoop, Letter, Source
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import group_offsets
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
