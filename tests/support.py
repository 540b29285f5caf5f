"""Test helpers that talk to the real local servers (no mocks)."""
from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from xdc.config import XdcConfig
from xdc.events import encode_notification, message_key, s3_record
from xdc.io.kafka import Record, make_producer, to_records
from xdc.topology import Site, Topology

_OPEN: dict[tuple[int, str], Topology] = {}  # closed after each test by the autouse fixture in conftest


def topo(cfg: XdcConfig, here: str) -> Topology:
    """The config seen from `here` (one per test and vantage point), closed when the test ends."""
    k = (id(cfg), here)
    if k not in _OPEN:
        _OPEN[k] = Topology(cfg, here)
    return _OPEN[k]


def site(cfg: XdcConfig, dc: str, *, seen_from: str | None = None) -> Site:
    """Datacenter `dc` as seen from `seen_from` (default: from itself), closed when the test ends."""
    return topo(cfg, seen_from or dc).site(dc)


def close_open_topologies() -> None:
    while _OPEN:
        _OPEN.popitem()[1].close()


def bootstrap(cfg: XdcConfig, dc: str) -> list[str]:
    return list(cfg.dc(dc).kafka.bootstrap_servers)


def produce(cfg: XdcConfig, dc: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    p = make_producer(bootstrap(cfg, dc))
    try:
        for key, value in messages:
            p.send(topic, key=key, value=value)
        p.flush(timeout=30)
    finally:
        p.close(timeout=5)


def put_event(bucket: str, key: str, *, seq: str, size: int = 1, etag: str = "e", t: float | None = None
              ) -> tuple[bytes, bytes]:
    rec = s3_record("put", bucket, key, size=size, etag=etag, sequencer=seq, event_time=t)
    return message_key(bucket, key), encode_notification([rec])


def delete_event(bucket: str, key: str, *, seq: str) -> tuple[bytes, bytes]:
    return message_key(bucket, key), encode_notification([s3_record("delete", bucket, key, sequencer=seq)])


def read_topic(cfg: XdcConfig, dc: str, topic: str, timeout_s: float = 5.0) -> list[Record]:
    """Everything in a topic, read without a group."""
    c = KafkaConsumer(bootstrap_servers=bootstrap(cfg, dc), group_id=None, enable_auto_commit=False)
    try:
        parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out.extend(to_records(c.poll(timeout_ms=300)))
            # done when every partition's position reached its highwater (known after a fetch)
            if all((hw := c.highwater(tp)) is not None and c.position(tp) >= hw for tp in tps):
                break
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()
