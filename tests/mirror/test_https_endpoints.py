"""The mirror between S3 endpoints that speak only HTTPS with certificates of a private CA (the
JuiceFS gateways behind real TLS-terminating proxies, a trustme CA), as companies run them."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.tlsproxy import TlsProxy
from mirror.runner import Mirror
from tests.support import blob as _blob
from tests.support import (
    make_tls,
    produce,
    put_event,
    put_multipart,
    read_topic,
    site,
    topo,
)
from xdc.config import XdcConfig, parse_config
from xdc.errors import StoreTrustError
from xdc.events import new_sequencer
from xdc.metrics import Metrics, new_registry

SRC, DST = "idca-drive", "idcb-drive"
MIB = 2**20


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tls(tmp_path_factory.mktemp("mirror-tls"))


@pytest.fixture
def proxies(xcfg: XdcConfig, tls: dict[str, Path]) -> Iterator[dict[str, TlsProxy]]:
    with TlsProxy(xcfg.dc("A").s3.internal_url, tls["broker.crt"], tls["broker.key"]) as a, \
            TlsProxy(xcfg.dc("B").s3.internal_url, tls["broker.crt"], tls["broker.key"]) as b:
        yield {"A": a, "B": b}


def https_config(cfg: XdcConfig, proxies: dict[str, TlsProxy], ca: Path) -> XdcConfig:
    """The same datacenters, their S3 reached only through the HTTPS proxies, trusting `ca`."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    for dc, p in proxies.items():
        s3 = data["datacenters"][dc]["s3"]
        s3["internal_url"] = s3["external_url"] = p.url
        s3["ca_bundle"] = str(ca)
    return parse_config(data, base_dir=cfg.base_dir)


def _objects(cfg: XdcConfig, tag: str) -> dict[str, tuple[str, bytes]]:
    """A 3-part multipart object and a single-part one in A (written over plain http), their events
    on A's topic. Returns key -> (ETag, bytes)."""
    a = site(cfg, "A").store
    parts = [_blob(5 * MIB, 1), _blob(5 * MIB, 2), _blob(2 * MIB, 3)]
    mp = f"camera/{tag}/multi.bin"
    etag_mp = put_multipart(a, SRC, mp, parts, ContentType="image/x-raw", Metadata={"sensor": "front"})
    single = f"camera/{tag}/single.bin"
    data = os.urandom(200_000)
    a.client.put_object(Bucket=SRC, Key=single, Body=data, ContentType="image/jpeg", Metadata={"sensor": "rear"})
    out = {mp: (etag_mp, b"".join(parts)), single: (hashlib.md5(data).hexdigest(), data)}
    produce(cfg, "A", cfg.dc("A").kafka.topics.events,
            [put_event(SRC, k, seq=new_sequencer(), size=len(d), etag=e) for k, (e, d) in out.items()])
    return out


def test_mirror_copies_through_https_endpoints_of_a_private_ca(xcfg: XdcConfig, proxies: dict[str, TlsProxy],
                                                               tls: dict[str, Path], tag: str) -> None:
    objs = _objects(xcfg, tag)
    cfg = https_config(xcfg, proxies, tls["ca.pem"])
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
        stats = m.run(once=True)
    assert stats.applied == 2 and stats.dead_letters == 0 and stats.etag_changed == 0
    assert proxies["A"].counts["bytes_down"] >= sum(len(d) for _, d in objs.values())  # read over TLS
    assert proxies["B"].counts["bytes_up"] >= sum(len(d) for _, d in objs.values())  # written over TLS
    b = site(xcfg, "B").store  # checked over plain http, independently of the copy's clients
    cat = site(xcfg, "B").state.catalog
    for key, (etag, data) in objs.items():
        head = b.client.head_object(Bucket=DST, Key=key)
        assert head["ETag"].strip('"') == etag  # the 3-part object keeps its multipart ETag
        assert b.get(DST, key) == data
        assert head["Metadata"]["sensor"] in ("front", "rear")
        src_head = site(xcfg, "A").store.client.head_object(Bucket=SRC, Key=key)
        assert head["ContentType"] == src_head["ContentType"]
        e = cat.get(DST, key)
        assert e is not None and e.etag == e.source_etag == etag


def test_mirror_stops_with_a_clear_error_when_the_ca_is_not_trusted(xcfg: XdcConfig, proxies: dict[str, TlsProxy],
                                                                    tls: dict[str, Path], tag: str) -> None:
    """A CA bundle that did not sign the endpoints' certificate: the mirror stops at once with a
    StoreTrustError naming the endpoint, the CA bundle and the fix; no event is dead-lettered and no
    offset committed (a fixed config mirrors everything afterwards)."""
    objs = _objects(xcfg, tag)
    wrong = https_config(xcfg, proxies, tls["other-ca.pem"])
    with Mirror(topo(wrong, "B"), metrics=Metrics(new_registry())) as m, pytest.raises(StoreTrustError) as ei:
        m.run(once=True)
    msg = str(ei.value)
    assert "certificate verify failed" in msg and str(tls["other-ca.pem"]) in msg and "ca_bundle" in msg
    assert proxies["A"].url in msg or proxies["B"].url in msg
    assert read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.dead_letter) == []
    assert site(xcfg, "B").state.catalog.offsets(xcfg.mirror.group_id + ".B") == {}
    right = https_config(xcfg, proxies, tls["ca.pem"])
    with Mirror(topo(right, "B"), metrics=Metrics(new_registry())) as m:
        assert m.run(once=True).applied == 2
    b = site(xcfg, "B").store
    assert all(b.head(DST, k).etag == e for k, (e, _) in objs.items())
