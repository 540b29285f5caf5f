"""The object store interface and its S3 backend.

`Store` has few primitives (list, head, open, put, delete); `copy_to` is derived in the base: it
streams, verifies size and checksum, and returns what landed (rclone's copy-then-verify). Errors are
translated once, at `_translate`. Retries follow the one policy (`xdc.retry`) at one level: each
single call is retried by the store; a copy is retried whole, and the calls inside it are not.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from xdc import trace
from xdc.errors import (
    IntegrityError,
    ObjectNotFound,
    StoreError,
    SupersededError,
    TransientStoreError,
    UnavailableError,
    XdcError,
)
from xdc.retry import NO_RETRY, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

META_SOURCE_ETAG = "xdc-source-etag"
META_SOURCE_SEQUENCER = "xdc-source-sequencer"

_RETRIABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "503", "500", "502", "504"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str  # without quotes
    metadata: dict[str, str] = field(default_factory=dict)
    last_modified: float = 0.0


def plain_md5_etag(etag: str) -> bool:
    """A single-part upload's ETag is the MD5 of the bytes; a multipart one has a '-N' suffix."""
    return len(etag) == 32 and "-" not in etag


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
    def put(self, bucket: str, key: str, body: BinaryIO | bytes, *,
            metadata: dict[str, str] | None = None, size: int | None = None) -> ObjectInfo: ...

    @abstractmethod
    def delete(self, bucket: str, key: str) -> None: ...

    @abstractmethod
    def ensure_bucket(self, bucket: str) -> None: ...

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
                expect_etag: str | None = None, metadata: dict[str, str] | None = None) -> ObjectInfo:
        """Stream bucket/key into dst, then verify size and checksum of what landed; the whole copy
        is retried by this store's policy (a torn read or a reset redoes it from the start).

        `expect_etag`: the ETag the caller expects at the source (the event's); a different one
        means the source changed since, and SupersededError is raised so that the newer event
        carries the newer bytes.
        """
        src, tgt = self.without_retry(), dst.without_retry()
        return self.retry.call(lambda: src._copy_once(tgt, bucket, key, dst_bucket, dst_key, expect_etag, metadata),
                               what=f"copy {bucket}/{key}")

    def _copy_once(self, dst: Store, bucket: str, key: str, dst_bucket: str, dst_key: str,
                   expect_etag: str | None, metadata: dict[str, str] | None) -> ObjectInfo:
        # steps of a traced copy (children of the caller's current span; no-ops otherwise)
        with trace.step("s3.source_read", store=self.name):
            info, body = self.open(bucket, key)
        try:
            if expect_etag and info.etag != expect_etag.strip('"'):
                raise SupersededError(f"{bucket}/{key}: source ETag {info.etag} != event's {expect_etag}")
            meta = dict(metadata or {})
            meta[META_SOURCE_ETAG] = info.etag
            if info.size <= dst.single_put_max:
                # small enough for one PUT: read it whole and check it before anything is written
                with trace.step("s3.transfer", bytes=info.size):
                    data = body.read()
                md5, size = hashlib.md5(data, usedforsecurity=False).hexdigest(), len(data)
                _check_read(bucket, key, info, size, md5)
                with trace.step("s3.target_write", store=dst.name, bytes=size):
                    landed = dst.put(dst_bucket, dst_key, data, metadata=meta)
            else:
                reader = _HashingReader(body)
                with trace.step("s3.transfer", bytes=info.size, streamed=True):  # read and write interleave
                    dst.put(dst_bucket, dst_key, reader, metadata=meta, size=info.size)
                md5 = reader.md5.hexdigest()
                _check_read(bucket, key, info, reader.size, md5)
                landed = dst.head(dst_bucket, dst_key)
            if landed.size != info.size:
                raise IntegrityError(f"{dst_bucket}/{dst_key}: landed {landed.size} bytes, expected {info.size}")
            if plain_md5_etag(landed.etag) and landed.etag != md5:
                raise IntegrityError(f"{dst_bucket}/{dst_key}: landed ETag {landed.etag} != MD5 {md5}")
            return landed
        finally:
            body.close()


def _check_read(bucket: str, key: str, info: ObjectInfo, size: int, md5: str) -> None:
    if size != info.size:
        raise IntegrityError(f"{bucket}/{key}: read {size} bytes, source says {info.size}")
    if plain_md5_etag(info.etag) and md5 != info.etag:
        raise IntegrityError(f"{bucket}/{key}: MD5 {md5} of the bytes read != source ETag {info.etag}")


class _HashingReader:
    """File-like wrapper that counts and hashes what passes through (for copy verification)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self._raw.read(n) if n is not None and n >= 0 else self._raw.read()
        self.md5.update(chunk)
        self.size += len(chunk)
        return chunk


def _translate(exc: Exception, what: str) -> XdcError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"{what}: not found")
        if code in _RETRIABLE_CODES or status >= 500:
            return TransientStoreError(f"{what}: {code or status} {err.get('Message', '')}".strip())
        return StoreError(f"{what}: {code} {err.get('Message', '')}".strip())
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionRefusedError)):
        return UnavailableError(f"{what}: {exc}")
    if isinstance(exc, (BotoConnectionError, ResponseStreamingError, ConnectionError, TimeoutError)):
        return TransientStoreError(f"{what}: {exc}")
    if isinstance(exc, BotoCoreError):
        return TransientStoreError(f"{what}: {exc}")
    return StoreError(f"{what}: {exc!r}")


class S3Store(Store):
    name = "s3"

    def __init__(self, endpoint_url: str, access_key: str, secret_key: str, *, region: str = "us-east-1",
                 retry: RetryPolicy | None = None, multipart_threshold: int = 16 * 2**20,
                 multipart_chunk: int = 8 * 2**20, max_pool: int = 32) -> None:
        self.endpoint_url = endpoint_url
        self.retry = retry or RetryPolicy()
        self.single_put_max = multipart_threshold
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            region_name=region,
            config=BotoConfig(
                # payload signing hashes every byte in Python; TLS protects the body where used
                s3={"addressing_style": "path", "payload_signing_enabled": False},
                # our own retry wrapper decides; botocore's would hide faults from it
                retries={"mode": "standard", "max_attempts": 1},
                max_pool_connections=max_pool,
                connect_timeout=5, read_timeout=30,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        # JuiceFS' gateway wants Content-MD5 on DeleteObjects (facts/components.md)
        self._client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=multipart_chunk, max_concurrency=4,
                                        use_threads=True)

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
                raise _translate(exc, what) from exc
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
                          dict(r.get("Metadata") or {}), r["LastModified"].timestamp())

    def open(self, bucket: str, key: str) -> tuple[ObjectInfo, BinaryIO]:
        r = self._call(f"get {bucket}/{key}", lambda: self._client.get_object(Bucket=bucket, Key=key))
        info = ObjectInfo(bucket, key, int(r["ContentLength"]), r.get("ETag", "").strip('"'),
                          dict(r.get("Metadata") or {}), r["LastModified"].timestamp())
        return info, _TranslatingBody(r["Body"], f"read {bucket}/{key}")

    def put(self, bucket: str, key: str, body: BinaryIO | bytes, *,
            metadata: dict[str, str] | None = None, size: int | None = None) -> ObjectInfo:
        what = f"put {bucket}/{key}"
        meta = dict(metadata or {})
        if isinstance(body, (bytes, bytearray, memoryview)):
            data = bytes(body)
            # Content-MD5: the server refuses a body damaged on the way
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
            r = self._call(what, lambda: self._client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=meta,
                                                                 ContentMD5=md5))
            return ObjectInfo(bucket, key, len(data), r.get("ETag", "").strip('"'), meta)
        # A stream can be read once: no retry here; the caller retries the whole copy.
        try:
            self._client.upload_fileobj(body, bucket, key, ExtraArgs={"Metadata": meta}, Config=self._transfer)
        except XdcError:
            raise
        except Exception as exc:  # noqa: BLE001
            cause = exc.__cause__ if isinstance(exc.__cause__, XdcError) else None
            raise (cause or _translate(exc, what)) from exc
        return ObjectInfo(bucket, key, size if size is not None else -1, "", meta)

    def delete(self, bucket: str, key: str) -> None:
        self._call(f"delete {bucket}/{key}", lambda: self._client.delete_object(Bucket=bucket, Key=key))

    def ensure_bucket(self, bucket: str) -> None:
        try:
            self._call(f"head bucket {bucket}", lambda: self._client.head_bucket(Bucket=bucket))
        except ObjectNotFound:
            try:
                self._call(f"create bucket {bucket}", lambda: self._client.create_bucket(Bucket=bucket))
            except StoreError as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                    raise


class _TranslatingBody:
    """Streaming body whose read errors (resets, truncation) surface as TransientStoreError."""

    def __init__(self, raw: Any, what: str) -> None:
        self._raw = raw
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._raw.read(n if n is not None and n >= 0 else None)
        except Exception as exc:  # noqa: BLE001
            raise _translate(exc, self._what) from exc

    def close(self) -> None:
        self._raw.close()


def _add_content_md5(request: Any, **_: Any) -> None:
    body = request.body if isinstance(request.body, bytes) else (request.body or b"")
    if isinstance(body, str):
        body = body.encode()
    request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
