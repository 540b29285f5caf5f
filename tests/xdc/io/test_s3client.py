"""Per-datacenter S3 settings used by every S3 client: HTTPS with a private CA (through a real
TLS-terminating proxy in front of the JuiceFS gateway, certificates from a test CA), signature
version, addressing style; and the one error translation."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, SSLError

from devtools.tlsproxy import TlsProxy
from tests.support import make_tls, site
from xdc.config import XdcConfig, parse_config
from xdc.errors import IntegrityError, StoreError, StoreTrustError
from xdc.io.objects import CopyJob
from xdc.io.s3client import S3Connection, translate
from xdc.io.s3copy import CopyEngine
from xdc.io.store import S3Store
from xdc.topology import Topology

SRC, DST = "idca-drive", "idcb-drive"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tls(tmp_path_factory.mktemp("s3tls"))


@pytest.fixture
def https_b(stack_cfg: XdcConfig, tls: dict[str, Path]) -> Iterator[TlsProxy]:
    """B's gateway behind HTTPS, its certificate signed by the test CA."""
    with TlsProxy(stack_cfg.dc("B").s3.internal_url, tls["broker.crt"], tls["broker.key"]) as p:
        yield p


def _keys(dc: str) -> tuple[str, str]:
    return os.environ[f"XDC_{dc}_ACCESS_KEY"], os.environ[f"XDC_{dc}_SECRET_KEY"]


def test_sync_store_over_https_with_the_private_ca(https_b: TlsProxy, tls: dict[str, Path], tag: str) -> None:
    st = S3Store(https_b.url, *_keys("B"), ca_bundle=str(tls["ca.pem"]))
    st.put(DST, f"camera/{tag}/tls.bin", b"over tls")
    assert st.get(DST, f"camera/{tag}/tls.bin") == b"over tls"
    assert https_b.counts["connections"] >= 1 and https_b.counts["bytes_up"] > 0


@pytest.mark.parametrize("ca", ["other-ca.pem", None])
def test_untrusted_certificate_is_a_clear_fatal_error(https_b: TlsProxy, tls: dict[str, Path], ca: str | None,
                                                      tag: str) -> None:
    """A CA that did not sign the endpoint's certificate (or the system's CAs, which do not know the
    test CA): StoreTrustError at once (no retries), naming the endpoint, the cause and the fix."""
    st = S3Store(https_b.url, *_keys("B"), ca_bundle=str(tls[ca]) if ca else None)
    with pytest.raises(StoreTrustError) as ei:
        st.put(DST, f"camera/{tag}/x.bin", b"x")
    msg = str(ei.value)
    assert https_b.url in msg and "certificate verify failed" in msg and "ca_bundle" in msg
    assert (str(tls[ca]) if ca else "system") in msg
    assert ei.value.fatal and not ei.value.retriable


def test_async_engine_over_https_and_untrusted(stack_cfg: XdcConfig, https_b: TlsProxy, tls: dict[str, Path],
                                               tag: str) -> None:
    a = site(stack_cfg, "A").store
    key = f"camera/{tag}/to-https.bin"
    info = a.put(SRC, key, os.urandom(300_000))
    good = S3Connection(https_b.url, *_keys("B"), ca_bundle=str(tls["ca.pem"]))
    bad = S3Connection(https_b.url, *_keys("B"), ca_bundle=str(tls["other-ca.pem"]))
    with CopyEngine() as eng:
        res = eng.copy(a.conn, good, CopyJob(SRC, key, DST, key))
        assert res.landed.etag == info.etag
        [err] = eng.copy_many(a.conn, bad, [CopyJob(SRC, key, DST, key + ".2")])
    assert isinstance(err, StoreTrustError) and "certificate verify failed" in str(err) and https_b.url in str(err)


def test_config_settings_reach_both_clients(stack_cfg: XdcConfig, tls: dict[str, Path], tag: str) -> None:
    """ca_bundle (relative to the config file), signature version and addressing style of a
    datacenter are what its sync store and the copy engine's client use: SigV2 ("s3") requests
    carry `Authorization: AWS key:signature`, and the JuiceFS gateway accepts them."""
    data = stack_cfg.model_dump(mode="json", exclude={"base_dir"})
    s3b = data["datacenters"]["B"]["s3"]
    s3b.update(signature_version="s3", addressing_style="path", ca_bundle=os.path.relpath(tls["ca.pem"], stack_cfg.base_dir))
    cfg = parse_config(data, base_dir=stack_cfg.base_dir)
    with Topology(cfg, "B") as topo:
        b = topo.here.store
        assert b.conn.ca_bundle == str(tls["ca.pem"]) and b.conn.signature_version == "s3"
        seen: list[str] = []
        b.client.meta.events.register("before-send.s3", lambda request, **_: seen.append(_auth(request)))
        b.put(DST, f"camera/{tag}/v2.bin", b"signed with v2")
        assert seen and all(h.startswith("AWS ") for h in seen)  # SigV2, not AWS4-HMAC-SHA256
        a = topo.site("A").store
        key = f"camera/{tag}/v2-copy.bin"
        a.put(SRC, key, b"copied with a v2-signed put")
        engine = topo.copier
        client = engine._run(engine._client(b.conn))
        async_seen: list[str] = []
        client.meta.events.register("before-send.s3", lambda request, **_: async_seen.append(_auth(request)))
        assert a.copy_to(b, SRC, key, DST, key).size == len(b"copied with a v2-signed put")
        assert async_seen and all(h.startswith("AWS ") for h in async_seen)
        assert b.get(DST, key) == b"copied with a v2-signed put"


def _auth(request: Any) -> str:
    h = request.headers.get("Authorization", b"")
    return h.decode() if isinstance(h, bytes) else str(h)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_translate_trust_and_digest_errors() -> None:
    conn = S3Connection("https://s3.idc-b.example.com", "k", "s", ca_bundle="/etc/xdc/ca.pem")
    err = translate(SSLError(endpoint_url=conn.endpoint_url, error="CERTIFICATE_VERIFY_FAILED"), "put b/k", conn)
    assert isinstance(err, StoreTrustError) and "/etc/xdc/ca.pem" in str(err) and err.fatal
    assert isinstance(translate(_client_error("SignatureDoesNotMatch", 403), "put", conn), StoreTrustError)
    assert isinstance(translate(_client_error("BadDigest", 400), "put", conn), IntegrityError)
    denied = translate(_client_error("AccessDenied", 403), "put", conn)
    assert type(denied) is StoreError and not denied.fatal  # one object's permission: dead-lettered, not fatal
    assert S3Connection("http://x", "k", "s").verify is True and conn.verify == "/etc/xdc/ca.pem"
    assert "s3cr3t" not in repr(S3Connection("http://x", "k", "s3cr3t"))  # never in logs
