"""A cache node whose JuiceFS volume lives on the datacenter's S3 behind HTTPS with a private CA:
the site hands the datacenter's s3.ca_bundle to juicefs (SSL_CERT_FILE), so format and mount trust
it; without it they fail. Real gateway, real TLS proxy, real FUSE mount."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cache_client.juicefs import mount_node, run_juicefs, umount_node
from devtools.tlsproxy import TlsProxy
from tests.support import make_tls
from xdc.config import XdcConfig, parse_config
from xdc.errors import CacheError
from xdc.topology import Topology


def test_volume_on_https_s3_mounts_with_the_datacenters_ca(stack_cfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    tls = make_tls(tmp_path / "tls")
    ak, sk = os.environ["XDC_B_ACCESS_KEY"], os.environ["XDC_B_SECRET_KEY"]
    meta = f"sqlite3://{tmp_path}/meta.db"
    with TlsProxy(stack_cfg.dc("B").s3.internal_url, tls["broker.crt"], tls["broker.key"]) as p:
        data = stack_cfg.model_dump(mode="json", exclude={"base_dir"})
        dc = data["datacenters"]["B"]
        dc["s3"].update(internal_url=p.url, external_url=p.url, ca_bundle=str(tls["ca.pem"]))
        dc["cache"] = {"meta_url": meta, "nodes": [{"name": "tls0", "mount": str(tmp_path / "mnt"),
                                                     "cache_dir": str(tmp_path / "cache"), "cache_size_mib": 64}]}
        cfg = parse_config(data, base_dir=stack_cfg.base_dir)
        with Topology(cfg, "B") as topo:
            cache = topo.here.cache_config
        assert cache.storage_ca_bundle == tls["ca.pem"]  # the datacenter's CA, handed down
        fmt = ["format", "--no-agent", "--storage", "minio", "--bucket", f"{p.url}/idcb-datasets",
               "--access-key", ak, "--secret-key", sk, meta, f"tls{tag}"]
        with pytest.raises(CacheError, match="idcb-datasets"):  # the system's CAs do not know the test CA
            run_juicefs(fmt, timeout=60)
        run_juicefs(fmt, timeout=60, ca_bundle=cache.storage_ca_bundle)
        node = cache.nodes[0]
        mount_node(meta, node, ca_bundle=cache.storage_ca_bundle)
        try:
            payload = os.urandom(300_000)
            (node.mount / "frame.bin").write_bytes(payload)
            os.sync()
            deadline = time.monotonic() + 30
            while p.counts["bytes_up"] < len(payload):  # the mount uploads its blocks through the proxy
                assert time.monotonic() < deadline, f"mount wrote nothing over TLS: {p.counts}"
                time.sleep(0.2)
            assert (node.mount / "frame.bin").read_bytes() == payload
        finally:
            umount_node(node)
