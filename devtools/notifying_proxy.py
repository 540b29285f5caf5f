"""A store that announces its writes: an S3 proxy in front of a datacenter's JuiceFS gateway that
publishes the S3 event notification of every successful write on that datacenter's events topic,
as AWS, MinIO and Ceph do with notifications configured.

    client ──S3──> notifying proxy ──S3──> JuiceFS gateway
                         └──> Kafka <dc events topic>: ObjectCreated:Put|Copy|CompleteMultipartUpload,
                              ObjectRemoved:Delete (also each key of a DeleteObjects),
                              ObjectTagging:Put|Delete, ObjectAcl:Put

Each event is a native S3 record (URL-encoded key, size, ETag, an S3-shaped sequencer that grows
per proxy, `userIdentity.principalId` = an opaque id of the requester, derived from its access key
but never the key itself: events land in Kafka's logs), keyed by bucket/key so one
object's events stay in order, and published before the write's answer goes back (AWS publishes
within seconds; tests need no wait). A failed publish is logged and counted, like a lost
notification.

The JuiceFS gateway has no object tagging and no PutObjectAcl (NotImplemented): the proxy keeps
tags and canned ACLs itself (SQLite, or memory) and serves them (GET/PUT/DELETE ?tagging, GET/PUT
?acl, `x-amz-tagging-count` on GET/HEAD, `x-amz-tagging` on PUT, copy and multipart uploads).

Run by the local stack as a process (`python -m devtools.notifying_proxy ...`), or in a thread
(`with NotifyingProxy(...) as p: p.url`) by the tests, one per test topic.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

import boto3
from botocore.config import Config as BotoConfig
from kafka import KafkaProducer

from devtools.httpforward import Answer, ServedInThread, Upstream, forward, read_body, relay, s3_error
from xdc.config import Brokers
from xdc.events import encode_notification, message_key, s3_record
from xdc.io.kafka import make_producer

log = logging.getLogger(__name__)

_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
_ETAG = re.compile(r"<ETag>(.*?)</ETag>", re.S)
_DELETED_KEY = re.compile(r"<Deleted>\s*<Key>(.*?)</Key>", re.S)
_UPLOAD_ID = re.compile(r"<UploadId>(.*?)</UploadId>", re.S)


def sequencer_now(last: int) -> tuple[int, str]:
    """The next S3-shaped sequencer (18 hex digits, like AWS's 0055AED6DCD90281E5), always growing."""
    n = max(time.time_ns(), last + 1)
    return n, format(n, "018X")


class _Meta:
    """Tags and canned ACLs the gateway cannot keep, by bucket/key."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (bucket TEXT, key TEXT, tags TEXT, acl TEXT, "
                         "PRIMARY KEY (bucket, key))")

    def get(self, bucket: str, key: str) -> tuple[dict[str, str], str | None]:
        with self._lock:
            row = self._db.execute("SELECT tags, acl FROM meta WHERE bucket=? AND key=?", (bucket, key)).fetchone()
        return (json.loads(row[0] or "{}"), row[1]) if row else ({}, None)

    def set_tags(self, bucket: str, key: str, tags: dict[str, str]) -> None:
        with self._lock:
            self._db.execute("INSERT INTO meta (bucket, key, tags) VALUES (?, ?, ?) ON CONFLICT (bucket, key) "
                             "DO UPDATE SET tags=excluded.tags", (bucket, key, json.dumps(tags)))

    def set_acl(self, bucket: str, key: str, acl: str | None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO meta (bucket, key, acl) VALUES (?, ?, ?) ON CONFLICT (bucket, key) "
                             "DO UPDATE SET acl=excluded.acl", (bucket, key, acl))

    def drop(self, bucket: str, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM meta WHERE bucket=? AND key=?", (bucket, key))

    def close(self) -> None:
        self._db.close()


class NotifyingProxy:
    """`with NotifyingProxy(upstream, brokers, topic, credentials=(key, secret)) as p: ... p.url`"""

    def __init__(self, upstream: str, brokers: Brokers | Sequence[str], topic: str, *,
                 credentials: tuple[str, str], region: str = "us-east-1", meta_path: Path | None = None,
                 host: str = "127.0.0.1", port: int = 0, producer: KafkaProducer | None = None) -> None:
        self.upstream = Upstream.parse(upstream)
        self.topic = topic
        self.region = region
        self.counts: Counter[str] = Counter()  # events published by name, "publish_failed"
        self._own_producer = producer is None
        # one request in flight per connection: a retry can never reorder one key's events
        self.producer = producer or make_producer(brokers, max_in_flight_requests_per_connection=1, linger_ms=0)
        self._client = boto3.session.Session().client(  # HEADs for copies and ?tagging on absent keys
            "s3", endpoint_url=upstream, aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1],
            region_name=region, config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))
        self.meta = _Meta(meta_path)
        self._seq_lock = threading.Lock()
        self._last_seq = 0
        self._parts: dict[str, dict[int, int]] = {}  # uploadId -> part number -> size
        self._upload_tags: dict[str, dict[str, str]] = {}
        self._served = ServedInThread(_QuietServer((host, port), _handler_for(self)), "notifying-proxy")

    @property
    def url(self) -> str:
        return self._served.url

    def start(self) -> NotifyingProxy:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()
        if self._own_producer:
            self.producer.close(timeout=5)
        self.meta.close()

    def __enter__(self) -> NotifyingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        try:
            self._served.server.serve_forever()
        finally:
            self.stop()

    # -- notifications ------------------------------------------------------------------------
    def announce(self, op: str, name: str, bucket: str, key: str, *, size: int = 0, etag: str = "",
                 principal: str = "", source_ip: str = "") -> None:
        """Publish one notification (synchronously: it is in Kafka when the write returns)."""
        with self._seq_lock:
            self._last_seq, seq = sequencer_now(self._last_seq)
            rec = s3_record(op, bucket, key, size=size, etag=etag, sequencer=seq, event_name=name,  # type: ignore[arg-type]
                            region=self.region)
            rec["userIdentity"] = {"principalId": principal}
            rec["requestParameters"] = {"sourceIPAddress": source_ip}
            fut = self.producer.send(self.topic, key=message_key(bucket, key), value=encode_notification([rec]))
        try:
            fut.get(timeout=30)
            self.counts[name] += 1
        except Exception as exc:  # noqa: BLE001 - a lost notification, as a real store may lose one
            self.counts["publish_failed"] += 1
            log.error("notification %s %s/%s not published: %r", name, bucket, key, exc)

    # -- the S3 requests that change something --------------------------------------------------
    def head(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            return self._client.head_object(Bucket=bucket, Key=key)  # type: ignore[no-any-return]
        except self._client.exceptions.ClientError:
            return None


def _xml_etag(body: bytes) -> str:
    """The ETag of a CopyObjectResult / CompleteMultipartUploadResult (quotes escaped as &quot; or &#34;)."""
    m = _ETAG.search(body.decode("utf-8", "replace"))
    return html.unescape(m.group(1)).strip().strip('"') if m else ""


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that closes early (a copy called off after the GET's headers) is not an error
        log.debug("notifying proxy: client %s went away", client_address, exc_info=True)


def _tag_xml(tags: dict[str, str]) -> bytes:
    body = "".join(f"<Tag><Key>{escape(k)}</Key><Value>{escape(v)}</Value></Tag>" for k, v in sorted(tags.items()))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Tagging xmlns="{_S3_NS}"><TagSet>{body}</TagSet>'
            f"</Tagging>").encode()


def _parse_tagging_xml(body: bytes) -> dict[str, str]:
    import xml.etree.ElementTree as ET  # noqa: N817 - stdlib idiom

    root = ET.fromstring(body)
    out = {}
    for tag in root.iter():
        if tag.tag.endswith("Tag") and not tag.tag.endswith("TagSet"):
            k = next((c.text for c in tag if c.tag.endswith("Key")), None)
            v = next((c.text for c in tag if c.tag.endswith("Value")), "")
            if k is not None:
                out[k] = v or ""
    return out


def _acl_xml(acl: str | None) -> bytes:
    owner = '<Grant><Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="CanonicalUser">' \
            "<ID>xdc</ID></Grantee><Permission>FULL_CONTROL</Permission></Grant>"
    group = ('<Grant><Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="Group"><URI>'
             "http://acs.amazonaws.com/groups/global/{who}</URI></Grantee><Permission>{perm}</Permission></Grant>")
    extra = {"public-read": [("AllUsers", "READ")], "public-read-write": [("AllUsers", "READ"), ("AllUsers", "WRITE")],
             "authenticated-read": [("AuthenticatedUsers", "READ")]}.get(acl or "private", [])
    grants = owner + "".join(group.format(who=w, perm=p) for w, p in extra)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<AccessControlPolicy xmlns="{_S3_NS}"><Owner><ID>xdc</ID>'
            f"</Owner><AccessControlList>{grants}</AccessControlList></AccessControlPolicy>").encode()


def principal_id(access_key: str) -> str:
    """A stable, opaque requester id (as AWS puts an IAM principal's id there, not a credential)."""
    return "AWS:XDC" + hashlib.sha256(access_key.encode()).hexdigest()[:17].upper()


def _handler_for(proxy: NotifyingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("notifying proxy: " + fmt, *args)

        def _answer(self, status: int, body: bytes = b"", content_type: str = "application/xml") -> None:
            self.send_response(status)
            if body:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
            body = read_body(self)
            m = _CREDENTIAL.search(self.headers.get("Authorization", ""))
            who = {"principal": principal_id(m.group(1)) if m else "", "source_ip": self.client_address[0]}
            method = self.command
            if key and ("tagging" in query or "acl" in query):
                self._object_meta(method, bucket, key, query, body, who)
                return
            ans = forward(proxy.upstream, method, self.path, self.headers.items(), body)
            ok = 200 <= ans.status < 300
            extra: list[tuple[str, str]] = []
            if key and method in ("GET", "HEAD") and ok:
                tags, _ = proxy.meta.get(bucket, key)
                if tags:
                    extra.append(("x-amz-tagging-count", str(len(tags))))
            if ok and key and method == "PUT" and "uploadId" in query:
                n = int(query.get("partNumber", ["0"])[0])
                proxy._parts.setdefault(query["uploadId"][0], {})[n] = len(body)
            elif ok and key and method == "PUT":
                self._created(bucket, key, body, ans, who)
            elif ok and key and method == "POST" and "uploads" in query:
                up = _UPLOAD_ID.search(ans.body.decode("utf-8", "replace"))
                if up and self.headers.get("x-amz-tagging"):
                    proxy._upload_tags[up.group(1)] = dict(parse_qsl(self.headers["x-amz-tagging"]))
            elif ok and key and method == "POST" and "uploadId" in query and b"CompleteMultipartUploadResult" in ans.body:
                upload = query["uploadId"][0]
                size = sum(proxy._parts.pop(upload, {}).values())
                proxy.meta.drop(bucket, key)
                if upload in proxy._upload_tags:
                    proxy.meta.set_tags(bucket, key, proxy._upload_tags.pop(upload))
                proxy.announce("put", "ObjectCreated:CompleteMultipartUpload", bucket, key, size=size,
                               etag=_xml_etag(ans.body), **who)
            elif ok and key and method == "DELETE" and "uploadId" in query:
                proxy._parts.pop(query["uploadId"][0], None)
            elif ok and key and method == "DELETE":
                proxy.meta.drop(bucket, key)
                proxy.announce("delete", "ObjectRemoved:Delete", bucket, key, **who)
            elif ok and not key and method == "POST" and "delete" in query:
                for k in _DELETED_KEY.findall(ans.body.decode("utf-8", "replace")):
                    k = unquote(k) if "encoding-type" in query else k
                    proxy.meta.drop(bucket, k)
                    proxy.announce("delete", "ObjectRemoved:Delete", bucket, k, **who)
            relay(self, ans, extra=extra)

        def _created(self, bucket: str, key: str, body: bytes, ans: Answer, who: dict[str, str]) -> None:
            src = self.headers.get("x-amz-copy-source")
            tagging = self.headers.get("x-amz-tagging")
            if src:
                sb, _, sk = unquote(src.split("?")[0]).lstrip("/").partition("/")
                etag = _xml_etag(ans.body)
                head = proxy.head(bucket, key)
                size = int(head["ContentLength"]) if head else 0
                if self.headers.get("x-amz-tagging-directive", "COPY").upper() == "REPLACE":
                    tags = dict(parse_qsl(tagging or ""))
                else:
                    tags, _ = proxy.meta.get(sb, sk)
                proxy.meta.drop(bucket, key)
                if tags:
                    proxy.meta.set_tags(bucket, key, tags)
                proxy.announce("put", "ObjectCreated:Copy", bucket, key, size=size, etag=etag, **who)
                return
            proxy.meta.drop(bucket, key)  # a new version: its tags and ACL are the request's
            if tagging:
                proxy.meta.set_tags(bucket, key, dict(parse_qsl(tagging)))
            if self.headers.get("x-amz-acl"):
                proxy.meta.set_acl(bucket, key, self.headers["x-amz-acl"])
            proxy.announce("put", "ObjectCreated:Put", bucket, key, size=len(body),
                           etag=(ans.header("ETag") or "").strip('"'), **who)

        def _object_meta(self, method: str, bucket: str, key: str, query: dict[str, list[str]], body: bytes,
                         who: dict[str, str]) -> None:
            if proxy.head(bucket, key) is None:
                s3_error(self, 404, "NoSuchKey", "The specified key does not exist.", request_id="notifying-proxy")
                return
            tags, acl = proxy.meta.get(bucket, key)
            if "tagging" in query:
                if method == "GET":
                    self._answer(200, _tag_xml(tags))
                elif method == "PUT":
                    proxy.meta.set_tags(bucket, key, _parse_tagging_xml(body))
                    self._answer(200)
                    proxy.announce("tags", "ObjectTagging:Put", bucket, key, **who)
                elif method == "DELETE":
                    proxy.meta.set_tags(bucket, key, {})
                    self._answer(204)
                    proxy.announce("tags", "ObjectTagging:Delete", bucket, key, **who)
                else:
                    s3_error(self, 405, "MethodNotAllowed", "not allowed", request_id="notifying-proxy")
                return
            if method == "GET":
                self._answer(200, _acl_xml(acl))
            elif method == "PUT":
                canned = self.headers.get("x-amz-acl")
                proxy.meta.set_acl(bucket, key, canned or "custom")
                self._answer(200)
                proxy.announce("acl", "ObjectAcl:Put", bucket, key, **who)
            else:
                s3_error(self, 405, "MethodNotAllowed", "not allowed", request_id="notifying-proxy")

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

    return Handler


def main(argv: Sequence[str] | None = None) -> int:
    """The local stack's proxy process for one datacenter (its config names brokers and topic)."""
    from xdc.app.env import load_env_file
    from xdc.config import load_config
    from xdc.topology import Topology

    p = argparse.ArgumentParser(prog="notifying_proxy")
    p.add_argument("--config", required=True)
    p.add_argument("--dc", required=True)
    p.add_argument("--upstream", required=True, help="the gateway, http://127.0.0.1:PORT")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--meta", help="SQLite file for tags and ACLs")
    p.add_argument("--env-file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    if args.env_file:
        load_env_file(args.env_file)
    topo = Topology(load_config(args.config, dc=args.dc))
    site = topo.here
    proxy = NotifyingProxy(args.upstream, site.brokers, site.topics.events,
                           credentials=site.config.s3.credentials.resolve(), region=site.config.s3.region,
                           meta_path=Path(args.meta) if args.meta else None, host=args.host, port=args.port)
    log.info("notifying proxy for %s on %s -> %s, events on %s", args.dc, proxy.url, args.upstream, site.topics.events)
    proxy.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

