"""Test helpers that talk to the real local servers (no mocks)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from kafka import KafkaConsumer, TopicPartition

from devtools import stack
from xdc.config import Brokers, XdcConfig
from xdc.events import encode_notification, iso, message_key, s3_record
from xdc.io.kafka import Record, client_kwargs, make_producer, to_records
from xdc.io.store import S3Store
from xdc.topology import Site, Topology

MIB = 2**20

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


def silent_store(cfg: XdcConfig, dc: str) -> S3Store:
    """Datacenter `dc`'s S3 gateway itself, behind the proxy that announces writes: a write here
    makes no event (a lost notification, or an out-of-band change)."""
    s3 = cfg.dc(dc).s3
    return S3Store(stack.gateway_url(cfg.base_dir, dc), *s3.credentials.resolve(), region=s3.region)


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


def eventbridge_event(detail_type: str, bucket: str, key: str, *, seq: str, size: int | None = None,
                      etag: str | None = None, reason: str = "", deletion_type: str = "",
                      t: float | None = None) -> dict[str, Any]:
    """An S3 event as EventBridge delivers it (the shape of AWS's documented examples)."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/"), "sequencer": seq}
    if size is not None:
        obj["size"] = size
    if etag is not None:
        obj["etag"] = etag
    detail: dict[str, Any] = {"version": "0", "bucket": {"name": bucket}, "object": obj,
                              "request-id": "N4N7GDK58NMKJ12R", "requester": "123456789012"}
    if reason:
        detail["reason"] = reason
    if deletion_type:
        detail["deletion-type"] = deletion_type
    return {"version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103", "detail-type": detail_type,
            "source": "aws.s3", "account": "111122223333", "time": iso(t if t is not None else time.time()),
            "region": "us-east-1", "resources": [f"arn:aws:s3:::{bucket}"], "detail": detail}


def sns_wrapped(inner: bytes) -> bytes:
    """An SNS notification carrying `inner` (an S3 notification) as its Message string."""
    return json.dumps({"Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
                       "TopicArn": "arn:aws:sns:us-east-1:111122223333:s3-events",
                       "Subject": "Amazon S3 Notification", "Message": inner.decode(),
                       "Timestamp": "2026-11-27T12:00:00.000Z", "SignatureVersion": "1"}).encode()


def sqs_wrapped(inner: bytes, field: str = "body") -> bytes:
    """An SQS source connector's record: the SQS message (its body `inner`) as a JSON document."""
    return json.dumps({"messageId": "059f36b4-87a3-44ab-83d2-661975830a7d", "receiptHandle": "AQEBwJnKyrHigUMZj6r",
                       field: inner.decode(), "attributes": {"ApproximateReceiveCount": "1"}}).encode()


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


def blob(n: int, seed: int) -> bytes:
    """Incompressible-looking bytes, cheap to make (a repeated random MiB shifted by the seed)."""
    unit = os.urandom(MIB)
    out = bytearray()
    while len(out) < n:
        out += unit[seed % MIB:] + unit[:seed % MIB]
        seed += 7919
    return bytes(out[:n])


def put_multipart(store: S3Store, bucket: str, key: str, parts: list[bytes], **extra: object) -> str:
    """Upload `parts` as one multipart object (as any SDK does); returns the ETag the endpoint gave."""
    c = store.client
    up = c.create_multipart_upload(Bucket=bucket, Key=key, **extra)
    done = []
    for i, p in enumerate(parts, 1):
        r = c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=i, Body=p)
        done.append({"ETag": r["ETag"], "PartNumber": i})
    r = c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": done})
    return str(r["ETag"]).strip('"')


def s3_multipart_etag(parts: list[bytes]) -> str:
    """S3's documented multipart ETag, computed here from the bytes."""
    return hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f"-{len(parts)}"


def restore_env(saved: dict[str, str | None]) -> None:
    """Put environment variables back as they were (None: it was not set)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
