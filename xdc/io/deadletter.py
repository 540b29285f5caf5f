"""The dead-letter topic: the original bytes plus why they could not be applied.

A dead letter keeps the message key and value as they were, and its headers (a W3C traceparent:
the object's trace goes on through a replay), and adds headers: reason, detail, origin
topic/datacenter/partition/offset, time. Each letter is logged at WARNING (a new kind of failure
shows up as a new log signature, `xdc problems`). Listing and replay are in `mirror.dlq`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer

from xdc.io.kafka import Record, kafka_errors
from xdc.io.state import Incidents

log = logging.getLogger(__name__)

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
    headers: tuple[tuple[str, bytes], ...] = ()  # the original message's own (e.g. traceparent)

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail, "origin": f"{self.origin_topic}"
                f"[{self.origin_partition}]@{self.origin_offset}", "time": self.time, "offset": self.offset,
                "size": len(self.value), "preview": self.value[:120].decode("utf-8", "replace")}


class DeadLetterSink:
    """Sends letters to a datacenter's dead-letter topic and records a summary row in its state."""

    def __init__(self, producer: KafkaProducer, topic: str, *, incidents: Incidents | None = None,
                 on_letter: Callable[[str, str], None] | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.incidents = incidents  # the dashboard's summary of recent letters
        self.on_letter = on_letter  # (topic, reason): metrics
        self.count = 0

    def send(self, record: Record, reason: str, detail: str, *, origin_dc: str = "") -> None:
        headers = [*own_headers(record.headers),
            ("xdc-reason", reason.encode()), ("xdc-detail", detail[:1000].encode("utf-8", "replace")),
            ("xdc-origin-topic", record.topic.encode()),
            ("xdc-origin-dc", origin_dc.encode()),
            ("xdc-origin-partition", str(record.partition).encode()),
            ("xdc-origin-offset", str(record.offset).encode()),
            ("xdc-time", repr(time.time()).encode()),
        ]
        with kafka_errors(f"dead-letter to {self.topic}"):
            self.producer.send(self.topic, key=record.key, value=record.value, headers=headers)
        self.count += 1
        log.warning("message %s[%d]@%d dead-lettered to %s (%s): %s", record.topic, record.partition, record.offset,
                    self.topic, reason, detail[:300])
        if self.incidents is not None:
            self.incidents.record_dead_letter(record.topic, record.partition, record.offset, reason, detail,
                                              len(record.value))
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
                      float(h.get("xdc-time", "0") or 0), r.key, r.value, r.offset, own_headers(r.headers))


def own_headers(headers: tuple[tuple[str, bytes], ...]) -> tuple[tuple[str, bytes], ...]:
    """A message's headers without the ones dead-lettering adds (a letter may be dead-lettered again)."""
    return tuple((k, v) for k, v in headers if not k.startswith("xdc-"))
