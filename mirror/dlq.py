"""The dead-letter topic: the original bytes plus why they could not be applied.

A dead letter keeps the message key and value as they were, and adds headers: reason, detail,
origin topic/partition/offset, time. `replay` sends letters back to their origin topic.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer

from xdc.config import Brokers
from xdc.kafka import Record, kafka_errors, make_consumer, to_records


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    detail: str
    origin_topic: str
    origin_dc: str  # whose broker holds origin_topic ("" if unknown)
    origin_partition: int | None
    origin_offset: int | None
    time: float
    key: bytes | None
    value: bytes
    offset: int = -1  # in the dead-letter topic

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail, "origin": f"{self.origin_topic}"
                f"[{self.origin_partition}]@{self.origin_offset}", "time": self.time, "offset": self.offset,
                "size": len(self.value), "preview": self.value[:120].decode("utf-8", "replace")}


class DeadLetterSink:
    def __init__(self, producer: KafkaProducer, topic: str, catalog: Any | None = None,
                 on_letter: Any | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.catalog = catalog  # records a summary row for the dashboard
        self.on_letter = on_letter
        self.count = 0

    def send(self, record: Record | None, reason: str, detail: str, *, origin_dc: str = "",
             value: bytes | None = None, key: bytes | None = None, origin_topic: str = "") -> None:
        value = record.value if record is not None else (value or b"")
        key = record.key if record is not None else key
        headers = [
            ("xdc-reason", reason.encode()), ("xdc-detail", detail[:1000].encode("utf-8", "replace")),
            ("xdc-origin-topic", (record.topic if record else origin_topic).encode()),
            ("xdc-origin-dc", origin_dc.encode()),
            ("xdc-origin-partition", str(record.partition if record else "").encode()),
            ("xdc-origin-offset", str(record.offset if record else "").encode()),
            ("xdc-time", repr(time.time()).encode()),
        ]
        with kafka_errors(f"dead-letter to {self.topic}"):
            self.producer.send(self.topic, key=key, value=value, headers=headers)
        self.count += 1
        if self.catalog is not None:
            self.catalog.record_dead_letter(record.topic if record else origin_topic,
                                            record.partition if record else None,
                                            record.offset if record else None, reason, detail, len(value))
        if self.on_letter is not None:
            self.on_letter(self.topic, reason)

    def flush(self) -> None:
        with kafka_errors(f"flush {self.topic}"):
            self.producer.flush(timeout=30)


def parse_letter(r: Record) -> DeadLetter:
    h = {k: v.decode("utf-8", "replace") for k, v in r.headers}
    part = h.get("xdc-origin-partition") or ""
    off = h.get("xdc-origin-offset") or ""
    return DeadLetter(h.get("xdc-reason", "?"), h.get("xdc-detail", ""), h.get("xdc-origin-topic", ""),
                      h.get("xdc-origin-dc", ""),
                      int(part) if part.lstrip("-").isdigit() else None,
                      int(off) if off.lstrip("-").isdigit() else None,
                      float(h.get("xdc-time", "0") or 0), r.key, r.value, r.offset)


def read_letters(brokers: Brokers | Sequence[str], topic: str, *, timeout_s: float = 5.0) -> Iterator[DeadLetter]:
    """Every letter in the topic up to its end when reading starts, without a consumer group
    (nothing is committed)."""
    consumer = make_consumer(brokers, None, consumer_timeout_ms=int(timeout_s * 1000))
    try:
        from kafka import TopicPartition
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        with kafka_errors(f"end offsets of {topic}"):
            ends = consumer.end_offsets(tps)
        idle_deadline = time.monotonic() + timeout_s
        while time.monotonic() < idle_deadline:
            if all(consumer.position(tp) >= ends.get(tp, 0) for tp in tps):
                return
            polled = consumer.poll(timeout_ms=300)
            if polled:
                idle_deadline = time.monotonic() + 1.0
                for rec in to_records(polled):
                    if rec.offset < ends.get(TopicPartition(rec.topic, rec.partition), 0):
                        yield parse_letter(rec)
    finally:
        consumer.close()


def replay(letters: list[DeadLetter], producer_for: Callable[[str], KafkaProducer], *,
           default_dc: str, topic: str | None = None) -> int:
    """Send letters back, unchanged, to their origin topic on their origin datacenter's broker
    (or to `topic`). `producer_for(dc)` gives a producer for that datacenter's Kafka."""
    by_dc: dict[str, list[DeadLetter]] = {}
    for d in letters:
        by_dc.setdefault(d.origin_dc or default_dc, []).append(d)
    n = 0
    with kafka_errors("replay dead letters"):
        for dc, group in by_dc.items():
            producer = producer_for(dc)
            for d in group:
                producer.send(topic or d.origin_topic, key=d.key, value=d.value,
                              headers=[("xdc-replayed-from", str(d.offset).encode())])
                n += 1
            producer.flush(timeout=30)
    return n


def summarize(letters: list[DeadLetter]) -> str:
    by: dict[str, int] = {}
    for d in letters:
        by[d.reason] = by.get(d.reason, 0) + 1
    return json.dumps(by, sort_keys=True)
