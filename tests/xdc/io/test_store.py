"""The store boundary: retry policy, error translation, copy verification (pure fakes), and the S3
backend against a real S3 endpoint behind the fault proxy."""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from devtools.faultproxy import FaultPlan, FaultProxy, Rule
from xdc.config import XdcConfig
from xdc.errors import (
    IntegrityError,
    ObjectNotFound,
    StoreError,
    SupersededError,
    TransientStoreError,
    UnavailableError,
    XdcError,
)
from xdc.io.s3client import translate as _translate
from xdc.io.store import ObjectInfo, S3Store, Store, _HashingReader, plain_md5_etag
from xdc.retry import RetryPolicy


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("exc, cls, retriable", [
    (_client_error("SlowDown", 503), TransientStoreError, True),
    (_client_error("InternalError", 500), TransientStoreError, True),
    (_client_error("NoSuchKey", 404), ObjectNotFound, False),
    (_client_error("AccessDenied", 403), StoreError, False),
    (EndpointConnectionError(endpoint_url="http://x"), UnavailableError, True),  # the endpoint is away: wait
    (ConnectionResetError(104, "reset"), TransientStoreError, True),
    (ValueError("?"), StoreError, False),
])
def test_translate(exc: Exception, cls: type[XdcError], retriable: bool) -> None:
    got = _translate(exc, "op")
    assert type(got) is cls and got.retriable is retriable


def test_retry_retries_only_retriable_and_gives_up_after_attempts() -> None:
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientStoreError("503")
        return "ok"
    assert RetryPolicy(3).call(flaky, what="x", sleep=sleeps.append) == "ok" and len(sleeps) == 2
    assert all(0 <= s <= 5.0 for s in sleeps)

    def always() -> None:
        raise TransientStoreError("503")
    with pytest.raises(TransientStoreError):
        RetryPolicy(4).call(always, what="x", sleep=sleeps.append)

    n = []

    def denied() -> None:
        n.append(1)
        raise StoreError("403")
    with pytest.raises(StoreError):
        RetryPolicy(5).call(denied, what="x", sleep=sleeps.append)
    assert len(n) == 1


class MemStore(Store):
    """In-memory store; `short` makes open() return fewer bytes than it announces (a torn read)."""

    def __init__(self, short: bool = False, lie_etag: bool = False) -> None:
        self.objs: dict[tuple[str, str], bytes] = {}
        self.short, self.lie_etag = short, lie_etag

    def _info(self, b: str, k: str) -> ObjectInfo:
        if (b, k) not in self.objs:
            raise ObjectNotFound(k)
        d = self.objs[(b, k)]
        etag = hashlib.md5(d, usedforsecurity=False).hexdigest()
        return ObjectInfo(b, k, len(d), "f" * 32 if self.lie_etag else etag)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        for (b, k) in sorted(self.objs):
            if b == bucket and k.startswith(prefix):
                yield self._info(b, k)

    def head(self, bucket: str, key: str) -> ObjectInfo:
        return self._info(bucket, key)

    def open(self, bucket: str, key: str) -> tuple[ObjectInfo, BinaryIO]:
        info = self._info(bucket, key)
        d = self.objs[(bucket, key)]
        return info, io.BytesIO(d[: len(d) // 2] if self.short else d)

    def put(self, bucket: str, key: str, body: BinaryIO | bytes, *, metadata: dict[str, str] | None = None,
            size: int | None = None, tags: Any = None) -> ObjectInfo:
        self.objs[(bucket, key)] = body if isinstance(body, bytes) else body.read()
        return self._info(bucket, key)

    def delete(self, bucket: str, key: str) -> None:
        self.objs.pop((bucket, key), None)

    def ensure_bucket(self, bucket: str) -> None:
        pass

    def ping(self, bucket: str) -> None:
        pass


def test_copy_to_verifies_size_and_md5() -> None:
    src, dst = MemStore(), MemStore()
    src.objs[("b", "k")] = os.urandom(1000)
    landed = src.copy_to(dst, "b", "k", "t", "k2")
    assert dst.objs[("t", "k2")] == src.objs[("b", "k")] and landed.size == 1000
    torn = MemStore(short=True)
    torn.objs[("b", "k")] = b"x" * 100
    with pytest.raises(IntegrityError):
        torn.copy_to(dst, "b", "k", "t", "k3")
    lying = MemStore(lie_etag=True)
    lying.objs[("b", "k")] = b"y" * 100
    with pytest.raises(IntegrityError, match="MD5"):
        lying.copy_to(dst, "b", "k", "t", "k4")
    with pytest.raises(SupersededError):
        src.copy_to(dst, "b", "k", "t", "k5", expect_etag="0" * 32)
    assert plain_md5_etag("0" * 32) and not plain_md5_etag("0" * 32 + "-2")


def test_s3store_through_faults(stack_cfg: XdcConfig) -> None:
    up = stack_cfg.dc("B").s3.internal_url
    ak, sk = os.environ["XDC_B_ACCESS_KEY"], os.environ["XDC_B_SECRET_KEY"]
    plan = FaultPlan(rules=[Rule("access_denied", "/idcb-drive/denied/"), Rule("truncate", "/idcb-drive/torn/")],
                     slowdown=0.3, methods=("HEAD",), seed=3)
    with FaultProxy(up, plan) as p:
        st = S3Store(p.url, ak, sk, retry=RetryPolicy(8))
        data = os.urandom(5000)
        st.put("idcb-drive", "ok/x.bin", data)
        for _ in range(10):  # HEADs hit SlowDown 30% of the time; retry hides it
            assert st.head("idcb-drive", "ok/x.bin").size == 5000
        assert p.counts["slowdown"] > 0
        assert st.get("idcb-drive", "ok/x.bin") == data
        with pytest.raises(StoreError) as ei:
            st.put("idcb-drive", "denied/x.bin", data)
        assert not ei.value.retriable and "AccessDenied" in str(ei.value)
        direct = S3Store(up, ak, sk)
        direct.put("idcb-drive", "torn/x.bin", data)
        with pytest.raises(TransientStoreError):
            st.get("idcb-drive", "torn/x.bin")
        assert p.counts["truncate"] == 1 and p.counts["access_denied"] == 1
        with pytest.raises(ObjectNotFound):
            st.head("idcb-drive", "ok/missing.bin")


def test_damaged_bodies_and_writes_that_land_unanswered_are_sent_again(stack_cfg: XdcConfig) -> None:
    """A PUT whose body is damaged on the way is refused by its Content-MD5 (BadDigest) and sent
    again; a part of a multipart upload damaged on the way lands as sent, and the copy finds it by
    the multipart ETag and redoes the copy; a write applied upstream whose answer is lost (reset
    after the fact) is sent again, harmlessly."""
    up = stack_cfg.dc("B").s3.internal_url
    ak, sk = os.environ["XDC_B_ACCESS_KEY"], os.environ["XDC_B_SECRET_KEY"]
    src = S3Store(stack_cfg.dc("A").s3.internal_url, os.environ["XDC_A_ACCESS_KEY"], os.environ["XDC_A_SECRET_KEY"])
    tag = os.urandom(4).hex()
    big = os.urandom(11 * 2**20 + 123)  # three 5 MiB parts
    src.put("idca-drive", f"mp/{tag}.bin", big)
    plan = FaultPlan(rules=[Rule("damage", f"/idcb-drive/small/{tag}", ("PUT",), times=1),
                            Rule("damage", f"/idcb-drive/mp/{tag}", ("PUT",), times=1),
                            Rule("reset_after", f"/idcb-drive/after/{tag}", ("PUT",), times=1)])
    with FaultProxy(up, plan) as p:
        st = S3Store(p.url, ak, sk, retry=RetryPolicy(4, base_s=0.01), multipart_threshold=5 * 2**20,
                     multipart_chunk=5 * 2**20)
        data = os.urandom(4000)
        assert st.put("idcb-drive", f"small/{tag}.bin", data).etag == hashlib.md5(data).hexdigest()
        assert st.get("idcb-drive", f"small/{tag}.bin") == data
        assert st.put("idcb-drive", f"after/{tag}.bin", data).size == 4000
        landed = src.copy_to(st, "idca-drive", f"mp/{tag}.bin", "idcb-drive", f"mp/{tag}.bin")
        assert landed.etag.endswith("-3") and st.get("idcb-drive", f"mp/{tag}.bin") == big
        assert p.counts["damage"] == 2 and p.counts["reset_after"] == 1
        puts = [f for _, m, path, f in p.requests_to(f"/mp/{tag}.bin", "PUT")]
        assert puts[0] == "damage" and len(puts) == 6, puts  # the copy was done twice, three parts each
    assert len(p.requests_to(f"/after/{tag}.bin", "PUT")) == 2  # applied, reset, sent again


def test_hashing_reader_predicts_the_multipart_etag() -> None:
    data = os.urandom(3 * 1000 + 17)
    r = _HashingReader(io.BytesIO(data), part_size=1000)
    while r.read(333):
        pass
    parts = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    want = hashlib.md5(b"".join(hashlib.md5(x).digest() for x in parts)).hexdigest() + "-4"
    assert (r.multipart_etag(), r.parts, r.md5.hexdigest()) == (want, 4, hashlib.md5(data).hexdigest())
