"""kafka-python at one boundary: producers, consumers, topics, lag. Errors become KafkaError.

Settings carry the local broker's pitfalls (facts/components.md): a group join takes about half of
session_timeout_ms, so it is short; `end_offsets` is wrong on Tansu, so lag uses `highwater()`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaConnectionError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
    UnknownMemberIdError,
)
from kafka.errors import KafkaError as _KafkaError
from kafka.structs import OffsetAndMetadata

from xdc.errors import KafkaError, RebalancedError

# No broker reachable is an outage, not a wrong request: worth waiting for.
_TRANSPORT = (KafkaConnectionError, KafkaTimeoutError)

log = logging.getLogger(__name__)

__all__ = ["Record", "make_producer", "make_consumer", "ensure_topics", "commit", "next_offsets", "rewind",
           "consumer_lag", "caught_up", "TopicPartition", "kafka_errors"]


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


# A commit refused because the group moved on: the partitions have a new owner, who will redo
# the batch from the committed offset (idempotent), so this process just carries on.
_REBALANCED = (CommitFailedError, IllegalGenerationError, UnknownMemberIdError, RebalanceInProgressError)


@contextmanager
def kafka_errors(what: str) -> Iterator[None]:
    """Translate kafka-python errors into our KafkaError at one place, keeping the client's own
    `retriable` flag (a connection error is retriable; a failed SASL login is not)."""
    try:
        yield
    except _REBALANCED as exc:
        raise RebalancedError(f"{what}: {exc!r}") from exc
    except _KafkaError as exc:
        err = KafkaError(f"{what}: {exc!r}")
        err.retriable = bool(getattr(exc, "retriable", False)) or isinstance(exc, _TRANSPORT)
        raise err from exc


def make_producer(bootstrap: list[str], **overrides: Any) -> KafkaProducer:
    conf: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        retries=5,
        max_request_size=16 * 1024 * 1024,
        request_timeout_ms=15000,
    )
    conf.update(overrides)
    with kafka_errors("connect producer"):
        return KafkaProducer(**conf)


def make_consumer(bootstrap: list[str], group_id: str | None, topics: Iterable[str] = (), *,
                  session_timeout_ms: int = 6000, heartbeat_interval_ms: int = 1000,
                  **overrides: Any) -> KafkaConsumer:
    conf: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,  # offsets are committed only after the apply is durable
        auto_offset_reset="earliest",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms,
        max_poll_interval_ms=300_000,
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    conf.update(overrides)
    with kafka_errors("connect consumer"):
        c = KafkaConsumer(**conf)
        topics = list(topics)
        if topics:
            c.subscribe(topics)
        return c


def to_records(polled: dict[TopicPartition, list[Any]]) -> list[Record]:
    out = []
    for msgs in polled.values():
        for m in msgs:
            out.append(Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp,
                              tuple((k, v) for k, v in (m.headers or []))))
    return out


def next_offsets(records: Iterable[Record]) -> dict[TopicPartition, int]:
    """last offset + 1 per partition of `records`: what a commit after them records."""
    offsets: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
    return offsets


def commit(consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    """Commit these offsets (synchronous)."""
    if offsets:
        with kafka_errors("commit offsets"):
            consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})


def rewind(consumer: KafkaConsumer, records: Iterable[Record]) -> None:
    """Seek each partition back to the first of `records`, so they are delivered again. A
    partition no longer assigned is left alone: its new owner starts from the committed offset."""
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    assigned = consumer.assignment()
    for tp, off in first.items():
        if tp in assigned:
            consumer.seek(tp, off)


def consumer_lag(consumer: KafkaConsumer) -> dict[TopicPartition, int]:
    """highwater - committed (or position) per assigned partition; valid after a fetch."""
    lag: dict[TopicPartition, int] = {}
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is None:
            continue
        try:
            done = consumer.committed(tp)
        except _KafkaError:
            done = None
        if done is None:
            done = consumer.position(tp)
        lag[tp] = max(0, hw - (done or 0))
    return lag


def caught_up(consumer: KafkaConsumer) -> bool:
    """Joined, and every assigned partition's position is at its highwater. A partition whose
    highwater is not known yet (no fetch answered) is not caught up."""
    parts = consumer.assignment()
    if not parts:
        return False
    for tp in parts:
        hw = consumer.highwater(tp)
        if hw is None or consumer.position(tp) < hw:
            return False
    return True


def ensure_topics(bootstrap: list[str], topics: Iterable[str], partitions: int, *,
                  timeout_s: float = 20.0) -> None:
    """Create topics that do not exist yet (idempotent)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            break
        except _KafkaError as exc:
            if time.monotonic() > deadline:
                raise KafkaError(f"broker {bootstrap} not reachable: {exc!r}") from exc
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in dict.fromkeys(topics) if t not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    except _KafkaError as exc:
        raise KafkaError(f"create topics on {bootstrap}: {exc!r}") from exc
    finally:
        admin.close()

