"""kafka-python at one boundary: producers, consumers, admin, offsets, lag. Errors become KafkaError.

Every client is made from a `Brokers` (addresses + security: the topology's `Site.brokers`) through
`client_kwargs`, so TLS and SASL apply to all of them; a plain address list means PLAINTEXT.
A secured broker is checked once before a client is built, so a wrong password or an untrusted
certificate fails at once with a KafkaAuthError instead of a 30 s bootstrap timeout.
A group join takes about half of session_timeout_ms, so it is short.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import kafka.errors as kerrors
import msgspec
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError as _KafkaError
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from xdc import trace
from xdc.config import Brokers
from xdc.errors import KafkaAuthError, KafkaError, RebalancedError
from xdc.io.kafka_security import as_brokers, check_brokers, kafka_python_kwargs

log = logging.getLogger(__name__)

__all__ = ["Record", "make_producer", "make_consumer", "make_admin", "group_offsets", "ensure_topics", "commit",
           "next_offsets", "rewind", "consumer_lag", "caught_up", "TopicPartition", "kafka_errors", "client_kwargs",
           "Brokers", "send_step"]


def client_kwargs(brokers: Brokers | Sequence[str]) -> dict[str, Any]:
    """bootstrap_servers and the security keyword arguments for any kafka-python client.

    Checks a secured broker first (KafkaAuthError when it refuses us), so use it for every client."""
    check_brokers(brokers)
    return kafka_python_kwargs(brokers)


class Record(msgspec.Struct, frozen=True):
    """One consumed message (a Struct: built per message on the hot path, ten times cheaper than a
    frozen dataclass)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


# A commit refused because the group moved on: the partitions have a new owner, who will redo
# the batch from the committed offset (idempotent), so this process just carries on.
_REBALANCED = (kerrors.CommitFailedError, kerrors.IllegalGenerationError, kerrors.UnknownMemberIdError,
               kerrors.RebalanceInProgressError)
# The broker refused our credentials or rights: KafkaAuthError, which names what to fix.
_AUTH = (kerrors.SaslAuthenticationFailedError, kerrors.UnsupportedSaslMechanismError, kerrors.AuthorizationError,
         kerrors.TopicAuthorizationFailedError, kerrors.GroupAuthorizationFailedError,
         kerrors.ClusterAuthorizationFailedError)


@contextmanager
def kafka_errors(what: str) -> Iterator[None]:
    """Translate kafka-python errors into our KafkaError at one place, keeping the client's own
    `retriable` flag for what the broker answered (a refused session timeout, an ACL, a message too
    large: not retriable), while trouble on the client's side of the wire (connections, timeouts,
    a broker away) is worth waiting for."""
    try:
        yield
    except _REBALANCED as exc:
        raise RebalancedError(f"{what}: {exc!r}") from exc
    except _AUTH as exc:
        raise KafkaAuthError(f"{what}: {exc!r}") from exc
    except _KafkaError as exc:
        err = KafkaError(f"{what}: {exc!r}")
        err.retriable = bool(getattr(exc, "retriable", False)) or not isinstance(exc, kerrors.BrokerResponseError)
        raise err from exc


def make_producer(brokers: Brokers | Sequence[str], **overrides: Any) -> KafkaProducer:
    conf: dict[str, Any] = dict(
        **client_kwargs(brokers),
        acks="all",
        linger_ms=5,
        retries=5,
        max_request_size=16 * 1024 * 1024,
        request_timeout_ms=15000,
    )
    conf.update(overrides)
    with kafka_errors("connect producer"):
        return KafkaProducer(**conf)


def send_step(producer: KafkaProducer, topic: str, *, key: bytes | None, value: bytes, parent: Any,
              attributes: dict[str, Any] | None = None, starts_object: bool = False) -> None:
    """Send a message that is a step of an object's trace: a `kafka.publish` span under `parent`,
    ended when the broker acknowledges it, whose context the message carries (traceparent).

    `starts_object`: the message starts the object's path (an S3 event): it carries an unsampled
    traceparent when `parent` is not traced, so later steps do not sample it again."""
    span = trace.child("kafka.publish", parent, attributes={**(attributes or {}), "messaging.destination": topic})
    hdrs = trace.new_object_headers(span) if starts_object else trace.headers(span)
    fut = producer.send(topic, key=key, value=value, headers=hdrs or None)
    if span is not None:
        fut.add_both(lambda outcome: trace.end(span, error=outcome if isinstance(outcome, Exception) else None))


def make_consumer(brokers: Brokers | Sequence[str], group_id: str | None, topics: Iterable[str] = (), *,
                  session_timeout_ms: int = 6000, heartbeat_interval_ms: int = 1000,
                  **overrides: Any) -> KafkaConsumer:
    conf: dict[str, Any] = dict(
        **client_kwargs(brokers),
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
            for t in topics:  # metadata before the group join (see xdc.io.consume.ConsumeLoop)
                c.partitions_for_topic(t)
            c.subscribe(topics)
        return c


def to_records(polled: dict[TopicPartition, list[Any]]) -> list[Record]:
    return [Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp,
                   tuple(m.headers) if m.headers else ())
            for msgs in polled.values() for m in msgs]


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


def consumer_lag(consumer: KafkaConsumer, timeout_ms: int = 5000) -> dict[TopicPartition, int]:
    """log end - committed (or position) per assigned partition; empty when the broker does not
    answer (a gauge must not stop a consume loop)."""
    lag: dict[TopicPartition, int] = {}
    parts = list(consumer.assignment())
    if not parts:
        return lag
    try:
        ends = consumer.end_offsets(parts, timeout_ms=timeout_ms)
    except _KafkaError as exc:
        log.debug("end offsets for the lag gauge: %r", exc)
        return lag
    for tp in parts:
        hw = ends.get(tp)
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


def caught_up(consumer: KafkaConsumer, timeout_ms: int = 5000) -> bool:
    """Joined, and every assigned partition's position is at the log end (one ListOffsets call).
    Not caught up when the broker does not answer within `timeout_ms` (the loop polls again)."""
    parts = list(consumer.assignment())
    if not parts:
        return False
    try:
        ends = consumer.end_offsets(parts, timeout_ms=timeout_ms)
        for tp in parts:
            pos = consumer.position(tp, timeout_ms=timeout_ms)  # None when not known in time
            if pos is None or pos < ends.get(tp, 0):
                return False
        return True
    except _KafkaError as exc:
        log.debug("end offsets for caught_up: %r", exc)
        return False


def group_offsets(brokers: Brokers | Sequence[str], group: str, *, timeout_s: float = 15.0) -> dict[TopicPartition, int]:
    """A group's committed offsets (OffsetFetch). Retries what the broker calls retriable: right after
    a broker start its group coordinator may still be loading (NOT_COORDINATOR, LOAD_IN_PROGRESS)."""
    deadline = time.monotonic() + timeout_s
    while True:
        admin = make_admin(brokers)
        try:
            got = admin.list_group_offsets(group).get(group, {})
            return {tp: om.offset for tp, om in got.items() if om.offset >= 0}
        except _KafkaError as exc:
            if not getattr(exc, "retriable", False) or time.monotonic() > deadline:
                raise KafkaError(f"committed offsets of group {group} on {as_brokers(brokers)}: {exc!r}") from exc
            time.sleep(0.3)
        finally:
            admin.close()


def make_admin(brokers: Brokers | Sequence[str], **overrides: Any) -> KafkaAdminClient:
    with kafka_errors(f"connect admin to {as_brokers(brokers)}"):
        return KafkaAdminClient(**{**client_kwargs(brokers), "request_timeout_ms": 10_000, **overrides})


def ensure_topics(brokers: Brokers | Sequence[str], topics: Iterable[str], partitions: int, *,
                  timeout_s: float = 20.0) -> None:
    """Create topics that do not exist yet (idempotent)."""
    deadline = time.monotonic() + timeout_s
    where = as_brokers(brokers)
    while True:
        try:
            admin = make_admin(brokers, request_timeout_ms=5000)
            break
        except KafkaError as exc:
            if not exc.retriable:
                raise
            if time.monotonic() > deadline:
                raise KafkaError(f"broker {where} not reachable: {exc}") from exc
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
        raise KafkaError(f"create topics on {where}: {exc!r}") from exc
    finally:
        admin.close()

