"""The object store interface and its S3 backend.

`Store` has few primitives (list, head, open, put, delete); `copy_to` and `copy_many` are derived in
the base: they stream, verify size and checksum, and return what landed (rclone's copy-then-verify).
`S3Store` is the synchronous boto3 backend; between two S3 stores `copy_many` runs on the async copy
engine (`xdc.io.s3copy`: same part layout, same ETag, metadata and tags kept) when the store was
given one. Errors are translated once (`xdc.io.s3client.translate`). Retries follow the one policy
(`xdc.retry`) at one level: each single call is retried by the store; a copy is retried whole (its
calls are not), or for a multipart copy part by part.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlencode

import boto3
from boto3.s3.transfer import TransferConfig
from s3transfer.utils import ChunksizeAdjuster
from botocore.config import Config as BotoConfig

from xdc import trace
from xdc.errors import (
    IntegrityError,
    ObjectNotFound,
    StoreError,
    SupersededError,
    XdcError,
)
from xdc.io.objects import (
    META_SOURCE_DC,
    META_SOURCE_ETAG,
    META_SOURCE_KEY,
    META_SOURCE_MTIME,
    META_SOURCE_SEQUENCER,
    CopyJob,
    CopyResult,
    ObjectInfo,
)
from xdc.io.parts import plain_md5_etag
from xdc.io.s3client import (
    AddressingStyle,
    S3Connection,
    SignatureVersion,
    add_content_md5,
    content_md5,
    translate,
)
from xdc.io.s3copy import CopyEngine
from xdc.retry import NO_RETRY, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["CANNED_ACLS", "META_SOURCE_DC", "META_SOURCE_ETAG", "META_SOURCE_KEY", "META_SOURCE_MTIME",
           "META_SOURCE_SEQUENCER", "CopyJob", "CopyResult", "ObjectInfo", "S3Store", "Store", "canned_acl",
           "plain_md5_etag", "tags_json", "translate"]

CANNED_ACLS = ("private", "public-read", "public-read-write", "authenticated-read")
_ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
_AUTH_USERS = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"


def tags_json(tags: Mapping[str, str] | None) -> str | None:
    """Tags as the state records them: a JSON object with sorted keys, None for no tags."""
    return json.dumps(dict(sorted(tags.items())), separators=(",", ":")) if tags else None


def canned_acl(grants: list[dict[str, Any]]) -> str:
    """The canned ACL a grant list stands for, or "custom:<json>" (grants naming accounts of one
    datacenter mean nothing in another, so only canned ACLs are mirrored onto objects)."""
    other = set()
    for g in grants:
        grantee = g.get("Grantee") or {}
        uri = grantee.get("URI")
        perm = g.get("Permission")
        if uri in (_ALL_USERS, _AUTH_USERS):
            other.add(("all" if uri == _ALL_USERS else "auth", perm))
        elif perm != "FULL_CONTROL":
            other.add((grantee.get("ID") or grantee.get("EmailAddress") or "?", perm))
    canned = {frozenset(): "private", frozenset({("all", "READ")}): "public-read",
              frozenset({("all", "READ"), ("all", "WRITE")}): "public-read-write",
              frozenset({("auth", "READ")}): "authenticated-read"}.get(frozenset(other))
    return canned or "custom:" + json.dumps(sorted(other))


class Store(ABC):
    """An object store: a handful of primitives; the rest is derived."""

    name: str = "store"
    single_put_max: int = 16 * 2**20  # larger objects stream as multipart uploads
    retry: RetryPolicy = RetryPolicy()

    def without_retry(self) -> Store:
        """The same store whose calls are not retried (for the steps of a composite operation)."""
        view = copy.copy(self)
        view.retry = NO_RETRY
        return view

    @abstractmethod
    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under prefix, in key order (UTF-8 binary), without user metadata."""

    @abstractmethod
    def head(self, bucket: str, key: str) -> ObjectInfo: ...

    @abstractmethod
    def open(self, bucket: str, key: str) -> tuple[ObjectInfo, BinaryIO]:
        """A streaming body and what it is (size, etag, metadata)."""

    @abstractmethod
    def put(self, bucket: str, key: str, body: BinaryIO | bytes, *, metadata: dict[str, str] | None = None,
            size: int | None = None, tags: Mapping[str, str] | None = None) -> ObjectInfo: ...

    @abstractmethod
    def delete(self, bucket: str, key: str) -> None: ...

    @abstractmethod
    def ensure_bucket(self, bucket: str) -> None: ...

    # -- optional capabilities (object tags and ACL): a store without them says so ----------------
    def get_tags(self, bucket: str, key: str) -> dict[str, str]:
        raise StoreError(f"{self.name}: object tags are not supported")

    def put_tags(self, bucket: str, key: str, tags: Mapping[str, str]) -> None:
        raise StoreError(f"{self.name}: object tags are not supported")

    def get_acl(self, bucket: str, key: str) -> str:
        """The object's ACL as a canned ACL name (`canned_acl`)."""
        raise StoreError(f"{self.name}: object ACLs are not supported")

    def put_acl(self, bucket: str, key: str, canned: str) -> None:
        raise StoreError(f"{self.name}: object ACLs are not supported")
    @abstractmethod
    def ping(self, bucket: str) -> None:
        """One cheap call (HEAD bucket), not retried: raises the store's error if it cannot be
        answered (UnavailableError when the endpoint cannot be reached)."""

    def part_size(self, size: int) -> int:
        """The part size a streaming put of `size` bytes uses (to predict a multipart ETag)."""
        return self.single_put_max

    # -- derived ---------------------------------------------------------------------------
    def get(self, bucket: str, key: str) -> bytes:
        _, body = self.open(bucket, key)
        try:
            return body.read()
        finally:
            body.close()

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.head(bucket, key)
            return True
        except ObjectNotFound:
            return False

    def copy_to(self, dst: Store, bucket: str, key: str, dst_bucket: str, dst_key: str, *,
                expect_etag: str | None = None, metadata: dict[str, str] | None = None,
                guard: Callable[[ObjectInfo], None] | None = None) -> ObjectInfo:
        """Stream bucket/key into dst, then verify size and checksum of what landed; the whole copy
        is retried by this store's policy (a torn read or a reset redoes it from the start).

        `expect_etag`: the ETag the caller expects at the source (the event's); a different one
        means the source changed since, and SupersededError is raised so that the newer event
        carries the newer bytes. `guard` sees the source's info (metadata included) before a byte
        is written and may raise to call the copy off (echoes, conflicts). The source's tags
        travel with the copy (read when the source reports some).
        """
        src, tgt = self.without_retry(), dst.without_retry()
        return self.retry.call(
            lambda: src._copy_once(tgt, bucket, key, dst_bucket, dst_key, expect_etag, metadata, guard),
            what=f"copy {bucket}/{key}")

    def copy_many(self, dst: Store, jobs: Sequence[CopyJob]) -> list[CopyResult | StoreError]:
        """Copy every job into dst; each result is what landed or the StoreError it ended with.
        Here one after the other through `copy_to`; S3 stores with a copy engine run them at once."""
        out: list[CopyResult | StoreError] = []
        for j in jobs:
            try:
                with trace.step(trace.COPY, j.trace, key=f"{j.dst_bucket}/{j.dst_key}"):  # as the engine does
                    landed = self.copy_to(dst, j.bucket, j.key, j.dst_bucket, j.dst_key, expect_etag=j.expect_etag,
                                          metadata=dict(j.metadata))
                src_etag = landed.metadata.get(META_SOURCE_ETAG, landed.etag)
                note = "" if landed.etag == src_etag else "copied in one stream: the source's part layout is not kept"
                out.append(CopyResult(landed, src_etag, "single" if landed.etag == src_etag else "rechunked", 1, note))
            except StoreError as exc:
                out.append(exc)
        return out

    def sweep_uploads(self, bucket: str, prefix: str, *, older_than_s: float) -> list[str]:
        """Abort multipart uploads under bucket/prefix older than `older_than_s` (left by a killed
        copier). Returns the keys whose uploads were aborted; stores without uploads have none."""
        return []

    def warm_copies(self, dst: Store, bucket: str, dst_bucket: str) -> None:
        """Ready what copies from bucket here to dst_bucket there will use (best effort); stores that
        copy synchronously have nothing to ready."""

    def _copy_once(self, dst: Store, bucket: str, key: str, dst_bucket: str, dst_key: str,
                   expect_etag: str | None, metadata: dict[str, str] | None,
                   guard: Callable[[ObjectInfo], None] | None = None) -> ObjectInfo:
        # steps of a traced copy (children of the caller's current span; no-ops otherwise)
        with trace.step(trace.SOURCE_READ, store=self.name):
            info, body = self.open(bucket, key)
        try:
            if expect_etag and info.etag != expect_etag.strip('"'):
                raise SupersededError(f"{bucket}/{key}: source ETag {info.etag} != event's {expect_etag}")
            if guard is not None:
                guard(info)
            meta = dict(metadata or {})
            meta[META_SOURCE_ETAG] = info.etag
            meta[META_SOURCE_MTIME] = repr(info.last_modified)
            tags = self.get_tags(bucket, key) if info.tag_count else None
            if info.size <= dst.single_put_max:
                # small enough for one PUT: read it whole and check it before anything is written
                with trace.step(trace.TRANSFER, bytes=info.size):
                    data = body.read()
                md5, size = hashlib.md5(data, usedforsecurity=False).hexdigest(), len(data)
                _check_read(bucket, key, info, size, md5)
                with trace.step(trace.TARGET_WRITE, store=dst.name, bytes=size):
                    landed = dst.put(dst_bucket, dst_key, data, metadata=meta, tags=tags)
            else:
                reader = _HashingReader(body, dst.part_size(info.size))
                with trace.step(trace.TRANSFER, bytes=info.size, streamed=True):  # read and write interleave
                    dst.put(dst_bucket, dst_key, reader, metadata=meta, size=info.size, tags=tags)
                md5 = reader.md5.hexdigest()
                _check_read(bucket, key, info, reader.size, md5)
                landed = dst.head(dst_bucket, dst_key)
                # a part damaged on the way lands as sent: its MD5 is in the multipart ETag
                expected = reader.multipart_etag()
                if landed.etag.endswith(f"-{reader.parts}") and landed.etag != expected:
                    raise IntegrityError(f"{dst_bucket}/{dst_key}: landed ETag {landed.etag} != {expected} "
                                         "of the parts sent (a part was damaged on the way)")
            if landed.size != info.size:
                raise IntegrityError(f"{dst_bucket}/{dst_key}: landed {landed.size} bytes, expected {info.size}")
            if plain_md5_etag(landed.etag) and landed.etag != md5:
                raise IntegrityError(f"{dst_bucket}/{dst_key}: landed ETag {landed.etag} != MD5 {md5}")
            return dataclasses.replace(landed, metadata={**landed.metadata, **meta}, tags=tags or {})
        finally:
            body.close()


def _check_read(bucket: str, key: str, info: ObjectInfo, size: int, md5: str) -> None:
    if size != info.size:
        raise IntegrityError(f"{bucket}/{key}: read {size} bytes, source says {info.size}")
    if plain_md5_etag(info.etag) and md5 != info.etag:
        raise IntegrityError(f"{bucket}/{key}: MD5 {md5} of the bytes read != source ETag {info.etag}")


class _HashingReader:
    """File-like wrapper that counts and hashes what passes through (for copy verification): the
    MD5 of the whole, and of each `part_size` part, from which S3 computes a multipart ETag
    (MD5 of the parts' MD5s, "-" number of parts)."""

    def __init__(self, raw: BinaryIO, part_size: int = 8 * 2**20) -> None:
        self._raw = raw
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0
        self._part_size = part_size
        self._part = hashlib.md5(usedforsecurity=False)
        self._part_left = part_size
        self._part_digests: list[bytes] = []

    def read(self, n: int = -1) -> bytes:
        chunk = self._raw.read(n) if n is not None and n >= 0 else self._raw.read()
        self.md5.update(chunk)
        self.size += len(chunk)
        view = memoryview(chunk)
        while view:
            take = view[:self._part_left]
            self._part.update(take)
            self._part_left -= len(take)
            view = view[len(take):]
            if self._part_left == 0:
                self._part_digests.append(self._part.digest())
                self._part, self._part_left = hashlib.md5(usedforsecurity=False), self._part_size
        return chunk

    @property
    def parts(self) -> int:
        return len(self._part_digests) + (self._part_left < self._part_size)

    def multipart_etag(self) -> str:
        digests = self._part_digests + ([self._part.digest()] if self._part_left < self._part_size else [])
        return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


class S3Store(Store):
    """The synchronous boto3 backend; copies into another S3 store go through `engine` when given."""

    name = "s3"

    def __init__(self, endpoint_url: str, access_key: str, secret_key: str, *, region: str = "us-east-1",
                 retry: RetryPolicy | None = None, multipart_threshold: int = 16 * 2**20,
                 multipart_chunk: int = 8 * 2**20, max_pool: int = 32, ca_bundle: str | None = None,
                 addressing_style: AddressingStyle = "path", signature_version: SignatureVersion = "s3v4",
                 engine: CopyEngine | None = None) -> None:
        self.conn = S3Connection(endpoint_url, access_key, secret_key, region=region, ca_bundle=ca_bundle,
                                 addressing_style=addressing_style, signature_version=signature_version)
        self.endpoint_url = endpoint_url
        self.retry = retry or RetryPolicy()
        self.single_put_max = multipart_threshold
        self.engine = engine
        self._client = boto3.session.Session().client(
            "s3", config=BotoConfig(**self.conn.botocore_config(max_pool=max_pool)), **self.conn.client_kwargs())
        # JuiceFS' gateway wants Content-MD5 on DeleteObjects (facts/components.md)
        self._client.meta.events.register("before-sign.s3.DeleteObjects", add_content_md5)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=multipart_chunk, max_concurrency=4,
                                        use_threads=True)

    def copy_many(self, dst: Store, jobs: Sequence[CopyJob]) -> list[CopyResult | StoreError]:
        if self.engine is None or not isinstance(dst, S3Store):
            return super().copy_many(dst, jobs)
        return self.engine.copy_many(self.conn, dst.conn, jobs)

    def copy_to(self, dst: Store, bucket: str, key: str, dst_bucket: str, dst_key: str, *,
                expect_etag: str | None = None, metadata: dict[str, str] | None = None,
                guard: Callable[[ObjectInfo], None] | None = None) -> ObjectInfo:
        # a guard looks at the source before a byte is written: the streaming copy does that
        if self.engine is None or not isinstance(dst, S3Store) or guard is not None:
            return super().copy_to(dst, bucket, key, dst_bucket, dst_key, expect_etag=expect_etag, metadata=metadata,
                                   guard=guard)
        # the engine's loop runs in another thread: the caller's current span goes along explicitly
        job = CopyJob(bucket, key, dst_bucket, dst_key, expect_etag, dict(metadata or {}), trace=trace.current())
        return self.engine.copy(self.conn, dst.conn, job).landed

    def warm_copies(self, dst: Store, bucket: str, dst_bucket: str) -> None:
        if self.engine is not None and isinstance(dst, S3Store):
            self.engine.warm([(self.conn, bucket), (dst.conn, dst_bucket)])

    def sweep_uploads(self, bucket: str, prefix: str, *, older_than_s: float) -> list[str]:
        now = datetime.now(timezone.utc)
        aborted: list[str] = []
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        open_here = set(self.engine.open_uploads) if self.engine else set()
        while True:
            page = self._call(f"list uploads {bucket}/{prefix}", lambda: self._client.list_multipart_uploads(**kw))
            for u in page.get("Uploads", []):
                started = u.get("Initiated")
                if u["UploadId"] in open_here or (
                        isinstance(started, datetime) and (now - started).total_seconds() < older_than_s):
                    continue
                try:
                    self._call(f"abort upload {bucket}/{u['Key']}", lambda u=u: self._client.abort_multipart_upload(
                        Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]))
                    aborted.append(u["Key"])
                except ObjectNotFound:
                    pass  # completed or aborted meanwhile
            if not page.get("IsTruncated"):
                break
            kw["KeyMarker"], kw["UploadIdMarker"] = page.get("NextKeyMarker", ""), page.get("NextUploadIdMarker", "")
        if aborted:
            log.info("swept %d abandoned multipart uploads under %s/%s", len(aborted), bucket, prefix)
        return aborted

    def __repr__(self) -> str:
        return f"S3Store({self.endpoint_url})"

    @property
    def client(self) -> Any:
        return self._client

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            try:
                return fn()
            except XdcError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated at this one boundary
                raise translate(exc, what, self.conn) from exc
        return self.retry.call(once, what=what)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"list {bucket}/{prefix}", lambda: self._client.list_objects_v2(**kw))
            for o in page.get("Contents", []):
                yield ObjectInfo(bucket, o["Key"], int(o["Size"]), o.get("ETag", "").strip('"'),
                                 {}, o["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def head(self, bucket: str, key: str) -> ObjectInfo:
        r = self._call(f"head {bucket}/{key}", lambda: self._client.head_object(Bucket=bucket, Key=key))
        return ObjectInfo(bucket, key, int(r["ContentLength"]), r.get("ETag", "").strip('"'),
                          dict(r.get("Metadata") or {}), r["LastModified"].timestamp(), _tag_count(r))

    def open(self, bucket: str, key: str) -> tuple[ObjectInfo, BinaryIO]:
        r = self._call(f"get {bucket}/{key}", lambda: self._client.get_object(Bucket=bucket, Key=key))
        info = ObjectInfo(bucket, key, int(r["ContentLength"]), r.get("ETag", "").strip('"'),
                          dict(r.get("Metadata") or {}), r["LastModified"].timestamp(), _tag_count(r))
        return info, _TranslatingBody(r["Body"], f"read {bucket}/{key}")

    def put(self, bucket: str, key: str, body: BinaryIO | bytes, *, metadata: dict[str, str] | None = None,
            size: int | None = None, tags: Mapping[str, str] | None = None) -> ObjectInfo:
        what = f"put {bucket}/{key}"
        meta = dict(metadata or {})
        extra: dict[str, Any] = {"Metadata": meta}
        if tags:
            extra["Tagging"] = urlencode(sorted(tags.items()))
        if isinstance(body, (bytes, bytearray, memoryview)):
            data = bytes(body)
            md5 = content_md5(data)  # the server refuses a body damaged on the way
            r = self._call(what, lambda: self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=md5,
                                                                 **extra))
            return ObjectInfo(bucket, key, len(data), r.get("ETag", "").strip('"'), meta)
        # A stream can be read once: no retry here; the caller retries the whole copy.
        try:
            self._client.upload_fileobj(body, bucket, key, ExtraArgs=extra, Config=self._transfer)
        except XdcError:
            raise
        except Exception as exc:  # noqa: BLE001
            cause = exc.__cause__ if isinstance(exc.__cause__, XdcError) else None
            raise (cause or translate(exc, what, self.conn)) from exc
        return ObjectInfo(bucket, key, size if size is not None else -1, "", meta)

    def delete(self, bucket: str, key: str) -> None:
        self._call(f"delete {bucket}/{key}", lambda: self._client.delete_object(Bucket=bucket, Key=key))

    def get_tags(self, bucket: str, key: str) -> dict[str, str]:
        r = self._call(f"get tags {bucket}/{key}", lambda: self._client.get_object_tagging(Bucket=bucket, Key=key))
        return {t["Key"]: t["Value"] for t in r.get("TagSet", [])}

    def put_tags(self, bucket: str, key: str, tags: Mapping[str, str]) -> None:
        if not tags:
            self._call(f"delete tags {bucket}/{key}",
                       lambda: self._client.delete_object_tagging(Bucket=bucket, Key=key))
            return
        tag_set = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
        self._call(f"put tags {bucket}/{key}", lambda: self._client.put_object_tagging(
            Bucket=bucket, Key=key, Tagging={"TagSet": tag_set}))

    def get_acl(self, bucket: str, key: str) -> str:
        r = self._call(f"get acl {bucket}/{key}", lambda: self._client.get_object_acl(Bucket=bucket, Key=key))
        return canned_acl(r.get("Grants", []))

    def put_acl(self, bucket: str, key: str, canned: str) -> None:
        if canned not in CANNED_ACLS:
            raise StoreError(f"put acl {bucket}/{key}: {canned[:80]!r} is not a canned ACL")
        self._call(f"put acl {bucket}/{key}", lambda: self._client.put_object_acl(Bucket=bucket, Key=key, ACL=canned))
    def ping(self, bucket: str) -> None:
        try:
            self._client.head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - translated at this one boundary
            raise translate(exc, f"head bucket {bucket} at {self.endpoint_url}", self.conn) from exc

    def part_size(self, size: int) -> int:
        # what s3transfer will use: the configured chunk, raised if the parts would exceed 10,000
        return int(ChunksizeAdjuster().adjust_chunksize(self._transfer.multipart_chunksize, size))

    def ensure_bucket(self, bucket: str) -> None:
        try:
            self._call(f"head bucket {bucket}", lambda: self._client.head_bucket(Bucket=bucket))
        except ObjectNotFound:
            try:
                self._call(f"create bucket {bucket}", lambda: self._client.create_bucket(Bucket=bucket))
            except StoreError as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                    raise


def _tag_count(r: Mapping[str, Any]) -> int:
    try:
        return int(r.get("TagCount") or 0)
    except (TypeError, ValueError):
        return 0


class _TranslatingBody:
    """Streaming body whose read errors (resets, truncation) surface as TransientStoreError."""

    def __init__(self, raw: Any, what: str) -> None:
        self._raw = raw
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._raw.read(n if n is not None and n >= 0 else None)
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, self._what) from exc

    def close(self) -> None:
        self._raw.close()
