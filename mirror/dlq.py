"""Dead letters for operators: list a datacenter's dead-letter topic, replay letters to their origin.

Both read the topic on the consume loop without a consumer group (nothing is committed: listing
twice shows the same letters). Replay sends each letter back unchanged, with an
`xdc-replayed-from` header, to its origin topic on the broker of the datacenter that owns that
topic; re-applying is safe because apply is idempotent.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from xdc.io.consume import Batch, ConsumeLoop, Letter, Source
from xdc.io.deadletter import DeadLetter, parse_letter
from xdc.io.kafka import TopicPartition, kafka_errors
from xdc.topology import Site, Topology


class _Collect:
    def __init__(self, reason: str | None) -> None:
        self.reason = reason
        self.letters: list[DeadLetter] = []

    def handle(self, batch: Batch) -> Sequence[Letter]:
        for rec in batch.records:
            d = parse_letter(rec)
            if self.reason is None or d.reason == self.reason:
                self.letters.append(d)
        return []


def read_letters(site: Site, *, reason: str | None = None, max_seconds: float = 60.0) -> list[DeadLetter]:
    """Every letter in the site's dead-letter topic (only those with `reason`), oldest first per partition."""
    topic = site.topics.dead_letter
    consumer = site.consumer(None)
    with kafka_errors(f"assign {topic}"):
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
    collect = _Collect(reason)
    loop = ConsumeLoop([Source(site.name, consumer, None)], collect, name="dlq", poll_timeout_s=0.3)
    try:
        loop.run(once=True, max_seconds=max_seconds)
    finally:
        loop.close()
    return collect.letters


def replay(topology: Topology, letters: Sequence[DeadLetter], *, topic: str | None = None) -> int:
    """Send letters back, unchanged (with their own headers, e.g. the traceparent), to their origin
    topic (or `topic`) on the broker of their origin datacenter (this one when the letter does not say)."""
    n = 0
    by_dc: dict[str, list[DeadLetter]] = {}
    for d in letters:
        by_dc.setdefault(d.origin_dc or topology.here.name, []).append(d)
    with kafka_errors("replay dead letters"):
        for dc, group in by_dc.items():
            producer = topology.site(dc).producer
            for d in group:
                producer.send(topic or d.origin_topic, key=d.key, value=d.value,
                              headers=[*d.headers, ("xdc-replayed-from", str(d.offset).encode())])
                n += 1
            producer.flush(timeout=30)
    return n


def summarize(letters: Sequence[DeadLetter]) -> str:
    by: dict[str, int] = {}
    for d in letters:
        by[d.reason] = by.get(d.reason, 0) + 1
    return json.dumps(by, sort_keys=True)
