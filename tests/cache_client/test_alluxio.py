"""The Alluxio backend on a real Alluxio 2.9 cluster over a real S3 endpoint (JuiceFS gateway).

One cluster for the module: master, job master, proxy, two workers (127.0.0.1, 127.0.0.2) with
their job workers, 1 MiB blocks (so a 2.5 MiB object is three blocks), 48 MiB per worker.
Objects go in through S3; expected values come from what the test put there and from the block
files found in each worker's storage directory, never from the backend itself.
"""
from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cache_client.alluxio import AlluxioCluster
from cache_client.base import CacheFile, FileStatus, get_backend
from cache_client.placement import BalancedPlacement, key_hashes
from cache_client.prewarm.pipeline import (
    Request,
    check_list,
    free_list,
    run_prewarm,
    to_cache_file,
)
from cache_client.prewarm.progress import Progress
from devtools import alluxio as ax
from devtools import stack
from devtools.procs import Proc, stop_proc
from tests.support import site
from xdc.config import CacheConfig, XdcConfig, parse_config
from xdc.errors import CapacityError, ConfigError
from xdc.io.store import S3Store
from xdc.retry import RetryPolicy

KIB = 1024
MIB = 1 << 20
QUOTA_MIB = 48
SIZES = {"a/one": 300 * KIB, "a/two": 700 * KIB + 1, "b/three": 2 * MIB + MIB // 2 + 123, "b/tiny": 100, "c/empty": 0}


class Env:
    def __init__(self, cluster: ax.LocalAlluxio, s3: S3Store) -> None:
        self.cluster = cluster
        self.s3 = s3

    def cache(self, placement: str = "replicate") -> CacheConfig:
        return CacheConfig(**self.cluster.cache_config(placement=placement, threads_per_node=4))

    def backend(self, placement: str = "replicate") -> AlluxioCluster:
        return AlluxioCluster(self.cache(placement))

    def put(self, bucket: str, sizes: dict[str, int]) -> dict[str, bytes]:
        """Create the bucket, mount it in Alluxio, put the objects; returns key -> bytes put."""
        self.s3.ensure_bucket(bucket)
        ax.mount_bucket(self.cluster, bucket)
        data = {k: os.urandom(n) for k, n in sizes.items()}
        for k, b in data.items():
            self.s3.put(bucket, k, b)
        return data

    def stored_blocks(self) -> dict[str, dict[int, int]]:
        """node -> block id -> bytes, from the block files in each worker's storage directory."""
        out: dict[str, dict[int, int]] = {}
        for w in self.cluster.workers:
            d = Path(w.store_dir) / "alluxioworker"
            out[w.name] = {int(p.name): p.stat().st_size for p in d.iterdir() if p.name.isdigit()} if d.exists() else {}
        return out


@pytest.fixture(scope="module")
def alx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    run = tmp_path_factory.mktemp("alluxio")
    key, secret = f"alx{secrets.token_hex(4)}", secrets.token_urlsafe(24)
    started: list[Proc] = []
    cluster: ax.LocalAlluxio | None = None
    try:
        meta = stack.format_volume(run / "A", "idca")
        gw = stack.start_gateway(run, "A", meta, key, secret)
        started.append(gw)
        url = f"http://127.0.0.1:{gw.port}"
        cluster = ax.start_cluster(run, "A", url, key, secret, root_bucket="idca-alluxio", workers=2,
                                   quota_mib=QUOTA_MIB, block_size_mib=1)
        print("alluxio ready; RSS MiB:", {p.name: round(ax.rss_mib(p)) for p in cluster.procs})
        yield Env(cluster, S3Store(url, key, secret, retry=RetryPolicy(max_attempts=3)))
    finally:
        if cluster is not None:
            ax.stop_cluster(cluster)
        for p in reversed(started):
            stop_proc(p)


@pytest.fixture
def bucket() -> str:
    return f"b{uuid.uuid4().hex[:12]}"


def files_of(bucket: str, keys: list[str]) -> list[CacheFile]:
    return [to_cache_file(f"{bucket}/{k}", "") for k in keys]


def test_backend_is_registered_and_configured() -> None:
    assert get_backend("alluxio") is AlluxioCluster
    with pytest.raises(ConfigError, match="needs alluxio"):
        parse_config(_one_dc({"backend": "alluxio", "nodes": [{"name": "n", "worker": "127.0.0.1:1"}]}, Path("/tmp")))
    with pytest.raises(ConfigError, match="needs worker"):
        parse_config(_one_dc({"backend": "alluxio", "alluxio": {"master": "h:1", "job_master": "h:2", "proxy": "h:3"},
                              "nodes": [{"name": "n"}]}, Path("/tmp")))
    with pytest.raises(ConfigError, match="needs meta_url"):
        parse_config(_one_dc({"nodes": [{"name": "n", "mount": "/m", "cache_dir": "/c"}]}, Path("/tmp")))


def test_plan_warm_check_free_replicated_on_both_workers(alx: Env, bucket: str) -> None:
    alx.put(bucket, SIZES)
    cluster = alx.backend("replicate")
    files = files_of(bucket, list(SIZES))
    total = sum(SIZES.values())

    plan = cluster.plan(files)
    assert (plan.files, plan.bytes, plan.missing) == (5, total, [])
    assert plan.cached_files == 1  # the empty object has no block: trivially cached
    assert {n: s.bytes for n, s in plan.shares.items()} == {"a0": total, "a1": total}

    progress = Progress(plan.bandwidth, render="none")
    report = cluster.warm(plan, progress)
    assert not report.errors, report.errors
    snap = progress.snapshot()
    assert (snap.files_done, snap.bytes_done) == (8, 2 * total)

    check = cluster.check(files)
    assert check.complete, check.to_dict()
    assert {f.bucket_key.split("/", 1)[1]: dict(f.cached) for f in check.files} == {
        k: {"a0": n, "a1": n} for k, n in SIZES.items()}

    # Where Alluxio says each block is == the block files in the workers' directories.
    places = cluster.locations(files)
    stored = alx.stored_blocks()
    for f in files:
        blocks = places[f.path]
        assert blocks is not None
        size = SIZES[f.bucket_key.split("/", 1)[1]]
        assert sum(b.length for b in blocks) == size
        assert len(blocks) == -(-size // MIB)  # 1 MiB blocks
        for b in blocks:
            assert b.nodes == ("a0", "a1")
            assert stored["a0"][b.block_id] == stored["a1"][b.block_id] == b.length

    again = cluster.plan(files)
    assert again.noop and again.cached_files == 5

    freed = cluster.free(files)
    assert freed.complete and freed.freed_bytes == {"a0": total, "a1": total} and freed.left_bytes == {"a0": 0, "a1": 0}
    after = cluster.check(files)
    assert [f.status for f in after.files] == [FileStatus.NOT_CACHED] * 4 + [FileStatus.CACHED]  # empty object
    ids = {b.block_id for f in files for b in (places[f.path] or [])}
    assert not ids & set(alx.stored_blocks()["a0"]) and not ids & set(alx.stored_blocks()["a1"])


def test_missing_object_is_reported_missing(alx: Env, bucket: str) -> None:
    alx.put(bucket, {"here": 10 * KIB})
    cluster = alx.backend()
    files = files_of(bucket, ["here", "never/put"])
    plan = cluster.plan(files)
    assert [f.bucket_key for f in plan.missing] == [f"{bucket}/never/put"]
    check = cluster.check(files)
    assert [(f.bucket_key, f.status) for f in check.files] == [
        (f"{bucket}/here", FileStatus.NOT_CACHED), (f"{bucket}/never/put", FileStatus.MISSING)]
    assert check.files[1].reason == "not in this datacenter's volume"


def test_s3_changes_after_a_listing_are_seen(alx: Env, bucket: str) -> None:
    """Metadata sync on every status call: a late put appears, a delete disappears."""
    alx.put(bucket, {f"d/k{i}": KIB for i in range(10)})  # >= 8 files in one dir: listed, not stat'ed
    cluster = alx.backend()
    files = files_of(bucket, [f"d/k{i}" for i in range(11)])
    assert list(cluster.stat(files).values()) == [KIB] * 10 + [None]
    alx.s3.put(bucket, "d/k10", b"x" * 77)
    alx.s3.delete(bucket, "d/k0")
    cluster = alx.backend()  # no memo carried over
    assert list(cluster.stat(files).values()) == [None] + [KIB] * 9 + [77]


def test_partial_load_says_exactly_which(alx: Env, bucket: str) -> None:
    alx.put(bucket, SIZES)
    cluster = alx.backend("replicate")
    files = files_of(bucket, list(SIZES))
    three = next(f for f in files if f.bucket_key.endswith("b/three"))
    one = next(f for f in files if f.bucket_key.endswith("a/one"))
    # one file on both workers, another on one worker only
    cluster.warm(cluster.plan([one]))
    cluster.warm_node("a1", [three], 2, lambda f, b: None)

    check = cluster.check(files)
    got = {f.bucket_key.split("/", 1)[1]: (f.status, dict(f.cached)) for f in check.files}
    n3, n1 = SIZES["b/three"], SIZES["a/one"]
    assert got == {
        "a/one": (FileStatus.CACHED, {"a0": n1, "a1": n1}),
        "a/two": (FileStatus.NOT_CACHED, {"a0": 0, "a1": 0}),
        "b/three": (FileStatus.PARTIAL, {"a0": 0, "a1": n3}),
        "b/tiny": (FileStatus.NOT_CACHED, {"a0": 0, "a1": 0}),
        "c/empty": (FileStatus.CACHED, {"a0": 0, "a1": 0}),
    }
    assert check.bytes_cached == 2 * n1 + n3
    assert "a0: 0 of" in check.by_status(FileStatus.PARTIAL)[0].reason
    stored = alx.stored_blocks()
    blocks = cluster.locations([three])[three.path] or []
    assert len(blocks) == 3 and all(b.nodes == ("a1",) for b in blocks)
    assert sum(stored["a1"][b.block_id] for b in blocks) == n3 and not any(b.block_id in stored["a0"] for b in blocks)

    # a re-plan asks only for what is not there: three on a0, two and tiny on both
    plan = cluster.plan(files)
    assert {n: sorted(f.bucket_key.split("/", 1)[1] for f in s.files) for n, s in plan.shares.items()} == {
        "a0": ["a/two", "b/three", "b/tiny"], "a1": ["a/two", "b/tiny"]}
    assert not cluster.warm(plan).errors
    assert cluster.check(files).complete
    assert cluster.free(files).complete


def test_shard_placement_puts_each_file_on_its_owner_only(alx: Env, bucket: str) -> None:
    sizes = {f"s/f{i}": (i + 1) * 50 * KIB for i in range(12)} | {"s/big": 2 * MIB + 5}
    alx.put(bucket, sizes)
    cluster = alx.backend("shard")
    files = files_of(bucket, list(sizes))
    # where the placement (cache_client.placement) puts each file, by its key and its size
    nodes = ["a0", "a1"]
    index = BalancedPlacement(nodes).assign_hashes(key_hashes(f.bucket_key for f in files),
                                                   np.array([sizes[f.path.split("/", 1)[1]] for f in files]))
    owner = {f.path: nodes[j] for f, j in zip(files, index.tolist())}
    assert set(owner.values()) == {"a0", "a1"}  # both nodes get a share

    report = cluster.warm(cluster.plan(files))
    assert not report.errors
    check = cluster.check(files)
    assert check.complete
    stored = alx.stored_blocks()
    for f, places in cluster.locations(files).items():
        assert places is not None
        assert {b.nodes for b in places} == {(owner[f],)}, f
        other = "a1" if owner[f] == "a0" else "a0"
        assert sum(stored[owner[f]][b.block_id] for b in places) == sizes[f.split("/", 1)[1]]
        assert not any(b.block_id in stored[other] for b in places)
    assert cluster.free(files).complete


def test_capacity_refused_or_trimmed(alx: Env, bucket: str) -> None:
    sizes = {f"big/{i}": 10 * MIB for i in range(6)}  # 60 MiB > 48 MiB per worker
    alx.put(bucket, sizes)
    cluster = alx.backend("replicate")
    files = files_of(bucket, list(sizes))
    with pytest.raises(CapacityError, match="a0: needs 60.0 MiB"):
        cluster.plan(files)
    used, cap = cluster.usage("a0")
    assert cap == QUOTA_MIB * MIB and used >= 0
    trimmed = cluster.plan(files, trim=True)
    assert trimmed.trimmed and all(len(s.files) == (cap - used) // (10 * MIB) for s in trimmed.shares.values())


def test_run_prewarm_check_and_reference_counted_free(alx: Env, bucket: str, tmp_path: Path) -> None:
    alx.put(bucket, {"p/one": 200 * KIB, "p/two": 1 * MIB + 1, "shared": 3 * KIB})
    cfg = _xdc_config(alx.cache("replicate"), tmp_path, [bucket])
    list_a = tmp_path / "a.txt"
    list_a.write_text(f"{bucket}/p/one\n{bucket}/p/two\n{bucket}/shared\n{bucket}/p/missing\n")
    list_b = tmp_path / "b.txt"
    list_b.write_text(f"{bucket}/shared\n")
    quiet = Progress(render="none")

    report = run_prewarm(site(cfg, "dca"), Request(str(list_a), "ds-a", "1"), progress=quiet, wait=False)
    assert report.check.counts == {"cached": 3, "partial": 0, "not_cached": 0, "missing": 1}
    assert run_prewarm(site(cfg, "dca"), Request(str(list_b), "ds-b", "1"), progress=Progress(render="none")).complete
    check = check_list(site(cfg, "dca"), Request(str(list_a)))
    assert [f.status for f in check.files] == [FileStatus.CACHED] * 3 + [FileStatus.MISSING]

    freed = free_list(site(cfg, "dca"), Request(str(list_a), "ds-a", "1"))
    assert list(freed.kept) == [f"{bucket}/shared"]  # ds-b still uses it
    after = check_list(site(cfg, "dca"), Request(str(list_a)))
    assert [f.status for f in after.files] == [FileStatus.NOT_CACHED, FileStatus.NOT_CACHED, FileStatus.CACHED,
                                              FileStatus.MISSING]
    assert free_list(site(cfg, "dca"), Request(str(list_b), "ds-b", "1")).complete
    assert check_list(site(cfg, "dca"), Request(str(list_b))).files[0].status is FileStatus.NOT_CACHED


# -- helpers ---------------------------------------------------------------------------------------
def _one_dc(cache: dict, base: Path) -> dict:
    return {
        "local_dc": "dca",
        "datacenters": {"dca": {
            "s3": {"internal_url": "http://127.0.0.1:1", "external_url": "http://127.0.0.1:1",
                   "credentials": {"access_key_env": "X", "secret_key_env": "Y"}},
            "kafka": {"bootstrap_servers": ["127.0.0.1:1"]},
            "state_url": f"sqlite:///{base / 'state.db'}",
            "cache": cache,
        }},
    }


def _xdc_config(cache: CacheConfig, tmp_path: Path, buckets: list[str]) -> XdcConfig:
    data = _one_dc(cache.model_dump(mode="json", exclude_none=True), tmp_path)
    data["datacenters"]["dca"]["buckets"] = buckets
    data["prewarm"] = {"ready_timeout_seconds": 30}
    return parse_config(data)
