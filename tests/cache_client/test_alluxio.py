"""What is Alluxio's own in the Alluxio backend, on a real Alluxio 2.9 cluster over a real S3 endpoint.

Datacenter A's cluster of the Alluxio test stack (tests/conftest.py `cache_backend`): master, job
master, proxy, two workers (127.0.0.1, 127.0.0.2) with their job workers, 1 MiB blocks (so a
2.5 MiB object is three blocks), 64 MiB per worker. Objects go in through S3; expected values come
from what the test put there and from the block files found in each worker's storage directory,
never from the backend itself. The flows every backend shares are in test_backends.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache_client.alluxio import AlluxioCluster
from cache_client.base import CacheFile, FileStatus, get_backend
from cache_client.placement import BalancedPlacement, key_hashes
from cache_client.prewarm.pipeline import to_cache_file
from cache_client.prewarm.progress import Progress
from tests.cache_client.conftest import AlluxioEnv, CacheEnv
from tests.conftest import ALLUXIO_WORKER_MIB
from xdc.config import parse_config
from xdc.errors import CapacityError, ConfigError

KIB = 1024
MIB = 1 << 20
SIZES = {"a/one": 300 * KIB, "a/two": 700 * KIB + 1, "b/three": 2 * MIB + MIB // 2 + 123, "b/tiny": 100, "c/empty": 0}


@pytest.fixture
def alx(cache_env: CacheEnv) -> AlluxioEnv:
    assert isinstance(cache_env, AlluxioEnv)
    return cache_env


def alluxio_only(fn):  # type: ignore[no-untyped-def]
    """Run on the Alluxio stack only (the session's cache_backend parameter "alluxio")."""
    return pytest.mark.parametrize("cache_backend", ["alluxio"], indirect=True)(fn)


def blocks_on_disk(alx: AlluxioEnv) -> dict[str, dict[int, int]]:
    return {w.name: alx.stored_blocks(w.name) for w in alx.local.workers}


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


@alluxio_only
def test_plan_warm_check_free_replicated_on_both_workers(alx: AlluxioEnv, bucket: str) -> None:
    alx.make_files(bucket, SIZES)
    cluster = alx.cluster("replicate")
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
    stored = blocks_on_disk(alx)
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
    assert not ids & set(blocks_on_disk(alx)["a0"]) and not ids & set(blocks_on_disk(alx)["a1"])


@alluxio_only
def test_missing_object_is_reported_missing(alx: AlluxioEnv, bucket: str) -> None:
    alx.make_files(bucket, {"here": 10 * KIB})
    cluster = alx.cluster()
    files = files_of(bucket, ["here", "never/put"])
    plan = cluster.plan(files)
    assert [f.bucket_key for f in plan.missing] == [f"{bucket}/never/put"]
    check = cluster.check(files)
    assert [(f.bucket_key, f.status) for f in check.files] == [
        (f"{bucket}/here", FileStatus.NOT_CACHED), (f"{bucket}/never/put", FileStatus.MISSING)]
    assert check.files[1].reason == "not in this datacenter's volume"


@alluxio_only
def test_s3_changes_after_a_listing_are_seen(alx: AlluxioEnv, bucket: str) -> None:
    """Metadata sync on every status call: a late put appears, a delete disappears."""
    alx.make_files(bucket, {f"d/k{i}": KIB for i in range(10)})  # >= 8 files in one dir: listed, not stat'ed
    cluster = alx.cluster()
    files = files_of(bucket, [f"d/k{i}" for i in range(11)])
    assert list(cluster.stat(files).values()) == [KIB] * 10 + [None]
    alx.s3.put(bucket, "d/k10", b"x" * 77)
    alx.s3.delete(bucket, "d/k0")
    cluster = alx.cluster()  # no memo carried over
    assert list(cluster.stat(files).values()) == [None] + [KIB] * 9 + [77]


@alluxio_only
def test_partial_load_says_exactly_which(alx: AlluxioEnv, bucket: str) -> None:
    alx.make_files(bucket, SIZES)
    cluster = alx.cluster("replicate")
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
    stored = blocks_on_disk(alx)
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


@alluxio_only
def test_shard_placement_puts_each_file_on_its_owner_only(alx: AlluxioEnv, bucket: str) -> None:
    sizes = {f"s/f{i}": (i + 1) * 50 * KIB for i in range(12)} | {"s/big": 2 * MIB + 5}
    alx.make_files(bucket, sizes)
    cluster = alx.cluster("shard")
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
    stored = blocks_on_disk(alx)
    for f, places in cluster.locations(files).items():
        assert places is not None
        assert {b.nodes for b in places} == {(owner[f],)}, f
        other = "a1" if owner[f] == "a0" else "a0"
        assert sum(stored[owner[f]][b.block_id] for b in places) == sizes[f.split("/", 1)[1]]
        assert not any(b.block_id in stored[other] for b in places)
    assert cluster.free(files).complete


@alluxio_only
def test_capacity_refused_or_trimmed(alx: AlluxioEnv, bucket: str) -> None:
    sizes = {f"big/{i}": 10 * MIB for i in range(7)}  # 70 MiB > 64 MiB per worker
    alx.make_files(bucket, sizes)
    cluster = alx.cluster("replicate")
    files = files_of(bucket, list(sizes))
    with pytest.raises(CapacityError, match="a0: needs 70.0 MiB"):
        cluster.plan(files)
    used, cap = cluster.usage("a0")
    assert cap == ALLUXIO_WORKER_MIB * MIB and used >= 0
    trimmed = cluster.plan(files, trim=True)
    assert trimmed.trimmed and all(len(s.files) == (cap - used) // (10 * MIB) for s in trimmed.shares.values())


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
