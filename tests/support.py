"""Test helpers that talk to the real local servers (no mocks)."""
from __future__ import annotations

import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from xdc.config import Brokers, XdcConfig
from xdc.events import encode_notification, message_key, s3_record
from xdc.io.kafka import Record, client_kwargs, make_producer, to_records
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


def brokers(cfg: XdcConfig, dc: str) -> Brokers:
    """Datacenter `dc`'s Kafka as seen from itself: addresses and security."""
    return Topology(cfg, dc).here.brokers


def produce(cfg: XdcConfig, dc: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    p = make_producer(brokers(cfg, dc))
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
    """Everything in a topic (up to its end when reading starts), read without a group."""
    c = KafkaConsumer(**client_kwargs(brokers(cfg, dc)), group_id=None, enable_auto_commit=False)
    try:
        parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        out: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(c.position(tp) >= ends[tp] for tp in tps):
                break
            out.extend(to_records(c.poll(timeout_ms=300)))
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()


def end_offsets(cfg: XdcConfig, dc: str, topic: str) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the partition's log end offset now."""
    c = KafkaConsumer(**client_kwargs(brokers(cfg, dc)), group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        return {(tp.topic, tp.partition): off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()


def make_tls(d: Path) -> dict[str, Path]:
    """A test CA (trustme) and PEM files: the CA, a broker certificate for 127.0.0.1/localhost with
    its key, a client certificate with its key (mTLS), and the CA file of an unrelated CA."""
    import trustme

    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    broker, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("xdc-client")
    files = {name: d / name for name in ("ca.pem", "broker.crt", "broker.key", "client.crt", "client.key",
                                         "other-ca.pem")}
    ca.cert_pem.write_to_path(str(files["ca.pem"]))
    for leaf, name in ((broker, "broker"), (client, "client")):
        leaf.private_key_pem.write_to_path(str(files[f"{name}.key"]))
        files[f"{name}.crt"].write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    trustme.CA().cert_pem.write_to_path(str(files["other-ca.pem"]))
    return files
