"""How the project's S3 clients reach an endpoint, and the one translation of their errors.

`S3Connection` holds one endpoint as a datacenter configures it: URL, credentials, the CA bundle
of an HTTPS endpoint signed by a private CA, addressing style and signature version. Every S3 client
of the project is built from it: the synchronous boto3 store (`xdc.io.store.S3Store`) and the
asynchronous copy engine (`xdc.io.s3copy`) take the same `botocore_config()` and `verify`.

`translate` maps boto3, aiobotocore and aiohttp errors onto the one exception tree (xdc.errors),
once, for both kinds of client.
"""
from __future__ import annotations

import base64
import hashlib
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ResponseStreamingError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from xdc.errors import (
    IntegrityError,
    ObjectNotFound,
    StoreError,
    StoreTrustError,
    TransientStoreError,
    UnavailableError,
    XdcError,
)

AddressingStyle = Literal["path", "virtual", "auto"]
SignatureVersion = Literal["s3v4", "s3"]

_RETRIABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "503", "500", "502", "504",
                    # the body was damaged on the way (the server checked its hash): send it again
                    "XAmzContentSHA256Mismatch", "IncompleteBody"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
# Refused credentials: no object is at fault and no retry helps.
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch"}


@dataclass(frozen=True)
class S3Connection:
    """One S3 endpoint as a client here reaches it."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    ca_bundle: str | None = None  # PEM file of the CA(s) to trust; None: the system's
    addressing_style: AddressingStyle = "path"
    signature_version: SignatureVersion = "s3v4"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0

    @property
    def verify(self) -> str | bool:
        """botocore's `verify`: the CA bundle to trust, or True for the system's."""
        return self.ca_bundle or True

    def client_kwargs(self) -> dict[str, Any]:
        """Arguments of `session.client("s3", ...)` (boto3 and aioboto3 alike)."""
        return {"endpoint_url": self.endpoint_url, "aws_access_key_id": self.access_key,
                "aws_secret_access_key": self.secret_key, "region_name": self.region, "verify": self.verify}

    def botocore_config(self, *, max_pool: int) -> dict[str, Any]:
        """Keyword arguments of botocore's `Config` (or aiobotocore's `AioConfig`)."""
        return {
            "signature_version": self.signature_version,
            # payload signing hashes every byte in Python; TLS (or Content-MD5) protects the body
            "s3": {"addressing_style": self.addressing_style, "payload_signing_enabled": False},
            # our own retry policy decides; botocore's would hide faults from it. (Its
            # `max_attempts` counts retries, not tries: 1 there meant a hidden second try.)
            "retries": {"mode": "standard", "total_max_attempts": 1},
            "max_pool_connections": max_pool,
            "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s,
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }

    def describe_tls(self) -> str:
        return f"CA bundle {self.ca_bundle}" if self.ca_bundle else "the system's CA certificates"


def translate(exc: BaseException, what: str, conn: S3Connection | None = None) -> XdcError:
    """A third-party error of an S3 call as the project's own (raise it `from exc`)."""
    if isinstance(exc, XdcError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        msg = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"{what}: not found")
        if code == "BadDigest":  # the body arrived damaged, or the source's bytes do not match its ETag
            return IntegrityError(msg)
        if code in _AUTH_CODES:
            return StoreTrustError(f"{msg} (credentials refused by {conn.endpoint_url if conn else 'the endpoint'})")
        if code in _RETRIABLE_CODES or status >= 500:
            return TransientStoreError(msg)
        return StoreError(msg)
    if _is_tls_failure(exc):
        where = conn.endpoint_url if conn else "the endpoint"
        trust = f"; trusted: {conn.describe_tls()}" if conn else ""
        return StoreTrustError(f"{what}: TLS handshake with {where} failed: {_root(exc)}{trust} "
                               "(set the datacenter's s3.ca_bundle to the CA that signed its certificate)")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionRefusedError)):
        return UnavailableError(f"{what}: {exc}")
    if isinstance(exc, (BotoConnectionError, ResponseStreamingError, ConnectionError, TimeoutError)):
        return TransientStoreError(f"{what}: {exc}")
    if isinstance(exc, BotoCoreError):
        return TransientStoreError(f"{what}: {exc}")
    if _is_aiohttp_error(exc):  # a body stream cut short, a payload error
        return TransientStoreError(f"{what}: {exc!r}")
    return StoreError(f"{what}: {exc!r}")


def _is_tls_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (SSLError, ssl.SSLError, ssl.CertificateError)):
            return True
        e = _wrapped(e) or e.__cause__ or e.__context__
    return False


def _wrapped(exc: BaseException) -> BaseException | None:
    """The error a botocore or aiohttp error wraps (botocore: kwargs["error"]; aiohttp: the
    certificate or OS error of a failed connection)."""
    for inner in ((getattr(exc, "kwargs", None) or {}).get("error"), getattr(exc, "certificate_error", None),
                  getattr(exc, "os_error", None)):
        if isinstance(inner, BaseException) and inner is not exc:
            return inner
    return None


def _root(exc: BaseException) -> str:
    """The innermost message (e.g. "certificate verify failed: unable to get local issuer certificate")."""
    msgs = []
    e: BaseException | None = exc
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        verify = getattr(e, "verify_message", None)
        if isinstance(e, ssl.SSLCertVerificationError) and verify:
            return f"certificate verify failed: {verify}"
        msgs.append(str(e))
        e = _wrapped(e) or e.__cause__ or e.__context__
    return msgs[-1] if msgs else repr(exc)


def _is_aiohttp_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("aiohttp")


def content_md5(data: bytes | bytearray | memoryview) -> str:
    """The Content-MD5 header of a body: the server refuses a body damaged on the way."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def add_content_md5(request: Any, **_: Any) -> None:
    """before-sign hook for DeleteObjects: JuiceFS' gateway requires Content-MD5 there."""
    body = request.body if isinstance(request.body, bytes) else (request.body or b"")
    if isinstance(body, str):
        body = body.encode()
    request.headers["Content-MD5"] = content_md5(body)
