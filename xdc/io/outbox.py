"""The one outbox publisher: the messages a state owes, sent to Kafka exactly once, in order per key.

The mirror queues its applied events in the state (the outbox) in the same transaction as the
catalog rows they announce; this sends them:

    claim rows (per key, one publisher at a time) -> rows a dead publisher marked: look for them
    in their partition -> mark where the rest go (durable) -> send (explicit partition, header
    xdc-outbox-id) -> flush -> delete the rows and marks

A publisher that dies after sending and before deleting leaves marks: the next publisher reads
the marked partitions from the marked offsets and skips what is already there, so a kill -9 at
any moment neither loses nor repeats a message. Partitions are chosen here (the Java client's
murmur2, like kafka-python's default), so the mark names the partition before the send.

What is left: a message still in flight in the dead process's socket that lands after the next
publisher looked (microseconds after the kill) would be sent twice; and two transactions queuing
rows of one key at once (two replicas on one source partition, which the consumer group prevents
except for a member that lost its session while still working) could be published in commit order
rather than queue order. Applied events carry sequencers, so readers can tell.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

from xdc.errors import KafkaError
from xdc.faults import crash_point
from xdc.io.kafka import kafka_errors
from xdc.io.state import ObjectCatalog, OutboxRow

log = logging.getLogger(__name__)

HEADER = "xdc-outbox-id"


class OutboxPublisher:
    def __init__(self, catalog: ObjectCatalog, producer: Callable[[], KafkaProducer],
                 reader: Callable[[], KafkaConsumer], *, name: str = "outbox", tag: str = "") -> None:
        """`producer` gives the producer and `reader` makes a group-less consumer of its broker, both
        only when a row is to be sent (an empty outbox needs no broker); `tag` is put before the row
        id in the header (the state's identity, so two states that publish to one topic do not
        mistake each other's rows)."""
        self.catalog = catalog
        self._producer = producer
        self._make_reader = reader
        self._reader: KafkaConsumer | None = None
        self.name = name
        self.tag = tag
        self.published = 0
        self.found_sent = 0  # rows a dead publisher had sent: not sent again
        self._lock = threading.Lock()  # one flush at a time in this process (the reader is not thread-safe)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @property
    def producer(self) -> KafkaProducer:
        return self._producer()

    @property
    def reader(self) -> KafkaConsumer:
        if self._reader is None:
            self._reader = self._make_reader()
        return self._reader

    def flush(self) -> int:
        """Send what the state owes; returns the number of messages sent."""
        with self._lock, self.catalog.claim_outbox() as claim:
            if not claim.rows:
                return 0
            rows = self._unsent(claim.rows)
            if not rows:
                return 0
            with kafka_errors(f"{self.name}: publish"):
                part = {r.id: self._partition(r) for r in rows}
                ends = self.reader.end_offsets(list({TopicPartition(r.message.topic, part[r.id]) for r in rows}))
                claim.mark_tried({r.id: (part[r.id], ends[TopicPartition(r.message.topic, part[r.id])]) for r in rows})
                for r in rows:
                    o = r.message
                    self.producer.send(o.topic, key=o.key, value=o.value, partition=part[r.id],
                                       headers=[*o.headers, (HEADER, self._header(r.id))])
                self.producer.flush(timeout=30)
            crash_point(f"{self.name}.in_outbox_flush")  # published, rows not yet deleted
            self.published += len(rows)
            return len(rows)

    def _header(self, row_id: int) -> bytes:
        return f"{self.tag}{row_id}".encode()

    def _partition(self, r: OutboxRow) -> int:
        """The partition the default partitioner would pick (murmur2 of the key), chosen here."""
        parts = self.producer.partitions_for(r.message.topic)
        if not parts:
            raise KafkaError(f"{self.name}: no partitions known for topic {r.message.topic}")
        ordered = sorted(parts)
        if r.message.key is None:
            return ordered[r.id % len(ordered)]
        return ordered[(murmur2(r.message.key) & 0x7FFFFFFF) % len(ordered)]

    def _unsent(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """The rows not already in Kafka: marked rows are looked for where their mark says."""
        marked = [r for r in rows if r.tried is not None]
        if not marked:
            return rows
        start: dict[TopicPartition, int] = {}
        for r in marked:
            assert r.tried is not None
            tp = TopicPartition(r.message.topic, r.tried[0])
            start[tp] = min(start.get(tp, r.tried[1]), r.tried[1])
        with kafka_errors(f"{self.name}: look for marked rows"):
            seen = _headers_from(self.reader, start, HEADER)
        sent = {r.id for r in marked if self._header(r.id) in seen}
        if sent:  # deleted with the claim's other rows
            log.info("%s: %d of %d marked rows were sent by a publisher that stopped; not sending them again",
                     self.name, len(sent), len(marked))
            self.found_sent += len(sent)
        return [r for r in rows if r.id not in sent]


def _headers_from(consumer: KafkaConsumer, start: dict[TopicPartition, int], header: str,
                  timeout_ms: int = 30_000) -> set[bytes]:
    """The values of `header` in each partition from its start offset to its end (now)."""
    ends = consumer.end_offsets(list(start))
    todo = {tp: off for tp, off in start.items() if off < ends[tp]}
    if not todo:
        return set()
    consumer.assign(list(todo))
    for tp, off in todo.items():
        consumer.seek(tp, off)
    found: set[bytes] = set()
    waited = 0
    while todo and waited < timeout_ms:
        polled: dict[Any, list[Any]] = consumer.poll(timeout_ms=500)
        if not polled:
            waited += 500
        for msgs in polled.values():
            for m in msgs:
                for k, v in m.headers or ():
                    if k == header:
                        found.add(v)
        for tp in list(todo):
            if consumer.position(tp) >= ends[tp]:
                del todo[tp]
    if todo:
        raise KafkaError(f"could not read {sorted(str(tp) for tp in todo)} to their end in {timeout_ms / 1000:g}s")
    return found
