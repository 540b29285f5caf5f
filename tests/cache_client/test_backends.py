"""Plan, prewarm, check, free and reference-counted free on every cache backend, on real clusters.

Each test runs on JuiceFS (two mounts of one volume) and on Alluxio (two workers of a real 2.9
cluster over S3): `cache_env` (tests/cache_client/conftest.py). Expected sizes come from what the
test put; what a node holds is cross-checked against the backend's own storage (`juicefs warmup
--check`, or the block files in the Alluxio worker's directory), not only the code under test.
"""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from cache_client.base import CacheFile, FileStatus
from cache_client.placement import BalancedPlacement
from cache_client.prewarm.pipeline import (
    Request,
    check_list,
    free_list,
    run_prewarm,
    to_cache_file,
    wait_ready,
)
from cache_client.prewarm.progress import Progress
from tests.cache_client.conftest import CacheEnv
from tests.cache_client.indexes import CAMS, nuscenes_v2_infos, under
from tests.mirror.chaos_support import write_config
from tests.support import site
from xdc.app.cli import main as cli_main
from xdc.config import XdcConfig
from xdc.errors import NotReadyError

MakeConfig = Callable[..., XdcConfig]

KIB = 1024
MIB = 1 << 20
# several blocks on Alluxio's 1 MiB test blocks; a small file, an empty one
SIZES = {"a/one": 300 * KIB, "a/two": 300 * KIB, "b/three": 5 * MIB + 123, "b/tiny": 100, "c/empty": 0}


def files_of(keys: list[str]) -> list[CacheFile]:
    return [to_cache_file(k, "") for k in keys]


def write_list(tmp_path: Path, keys: list[str], name: str = "list.txt") -> Path:
    p = tmp_path / name
    p.write_text("".join(k + "\n" for k in keys))
    return p


def test_plan_warm_check_rerun_free(cache_env: CacheEnv, bucket: str) -> None:
    keys = cache_env.make_files(bucket, SIZES)
    cluster = cache_env.cluster()
    n1, n2 = cluster.nodes
    files = files_of(keys)
    total = sum(SIZES.values())
    assert [cache_env.cached_percent(n, keys) for n in (n1, n2)] == [0.0, 0.0]

    plan = cluster.plan(files)
    assert (plan.files, plan.bytes, plan.cached_files, plan.missing) == (5, total, 1, [])  # the empty file is trivially cached
    assert {n: (len(s.files), s.bytes) for n, s in plan.shares.items()} == {n1: (4, total), n2: (4, total)}
    assert plan.warm_bytes == 2 * total and plan.eta_seconds > 0  # the empty file needs no load

    progress = Progress(plan.bandwidth, render="none")
    report = cluster.warm(plan, progress)
    assert not report.errors
    assert progress.snapshot().bytes_done == 2 * total and progress.snapshot().files_done == 8

    check = cluster.check(files)
    assert check.complete and check.cached_ratio == 1.0, check.to_dict()
    assert {f.bucket_key.split("/", 1)[1]: dict(f.cached) for f in check.files} == {
        k: {n1: size, n2: size} for k, size in SIZES.items()}
    assert [cache_env.cached_percent(n, keys) for n in (n1, n2)] == [100.0, 100.0]  # the backend's own storage agrees

    again = cluster.plan(files)
    assert again.noop and again.cached_files == 5 and again.cached_bytes == total

    freed = cluster.free(files)
    assert freed.complete and freed.freed_bytes == {n1: total, n2: total}
    after = cluster.check(files)
    assert [f.status for f in after.files] == [FileStatus.NOT_CACHED] * 4 + [FileStatus.CACHED]  # empty file
    assert [cache_env.cached_percent(n, keys) for n in (n1, n2)] == [0.0, 0.0]


def test_run_prewarm_reports_missing_and_unreadable_entries(
    cache_env: CacheEnv, bucket: str, tmp_path: Path, make_config: MakeConfig
) -> None:
    keys = cache_env.make_files(bucket, {"x/1": 200 * KIB, "x/2": 200 * KIB})
    # The missing key comes FIRST: passed to `juicefs warmup` as is, this is a FATAL exit 1.
    lst = write_list(tmp_path, [f"{bucket}/x/nope", *keys, "not a key/"])
    cfg = make_config(cache_env.cache, tmp_path, [bucket])
    report = run_prewarm(site(cfg, "dca"), Request(str(lst)), progress=Progress(render="none"), wait=False)
    assert not report.complete
    assert report.check.counts == {"cached": 2, "partial": 0, "not_cached": 0, "missing": 1}
    reasons = {d.get("bucket_key", d.get("entry")): d["reason"] for d in report.not_cached}
    assert reasons[f"{bucket}/x/nope"] == "not in this datacenter's volume"
    assert len(reasons) == 2  # + the unreadable line
    assert report.to_dict()["plan"]["missing"] == [f"{bucket}/x/nope"]
    runs = site(cfg, "dca").state.prewarm.runs(min_seconds=0)  # the run's bandwidth was recorded
    assert [(b, f) for b, f, _ in runs] == [(800 * KIB, 4)]
    assert [cache_env.cached_percent(n, keys) for n in cache_env.cluster().nodes] == [100.0, 100.0]

    checked = check_list(site(cfg, "dca"), Request(str(lst)))
    assert checked.counts["cached"] == 2 and checked.rejected

    with pytest.raises(NotReadyError) as exc:
        wait_ready(site(cfg, "dca"), [to_cache_file(k, "") for k in [*keys, f"{bucket}/x/nope"]], timeout=0, poll=0.1)
    assert exc.value.missing == [f"{bucket}/x/nope"]  # type: ignore[attr-defined]
    assert free_list(site(cfg, "dca"), Request(str(lst)), force=True).complete


def test_warm_survives_a_file_vanishing_before_warmup(cache_env: CacheEnv, bucket: str) -> None:
    keys = cache_env.make_files(bucket, {"v/gone": 10 * KIB, "v/kept": 10 * KIB})
    cluster = cache_env.cluster()
    node = cluster.nodes[0]
    files = [CacheFile(f.bucket_key, f.path, 10 * KIB) for f in files_of(keys)]
    cache_env.remove(keys[0])  # after the plan's stat, first in the list
    done: list[tuple[int, int]] = []
    cluster.warm_node(node, files, 2, lambda f, b: done.append((f, b)))
    assert sum(f for f, _ in done) == 2  # both accounted for, no failure
    assert cluster.cached_bytes(node, files[1:]) == {files[1].path: 10 * KIB}
    assert cache_env.cached_percent(node, keys[1:]) == 100.0
    assert cluster.free(files[1:]).complete


def test_shard_placement_warms_each_file_on_its_owner_only(cache_env: CacheEnv, bucket: str) -> None:
    keys = cache_env.make_files(bucket, {f"s/{i}": 64 * KIB for i in range(12)})
    cluster = cache_env.cluster("shard")
    files = files_of(keys)
    plan = cluster.plan(files)
    placed = BalancedPlacement(cluster.nodes).assign(keys, [64 * KIB] * len(keys))
    owner = {k: n for n, ks in placed.items() for k in ks}
    assert {n: sorted(f.bucket_key for f in s.files) for n, s in plan.shares.items()} == {
        n: sorted(ks) for n, ks in placed.items()
    }
    assert sorted(len(ks) for ks in placed.values()) == [6, 6]  # balanced
    assert not cluster.warm(plan).errors
    check = cluster.check(files)
    assert check.complete
    for f in check.files:
        assert list(f.cached) == [owner[f.bucket_key]]
    for node in cluster.nodes:  # and nothing on the other node, as its own storage says too
        theirs = [k for k in keys if owner[k] != node]
        assert sum(cluster.cached_bytes(node, files_of(theirs)).values()) == 0
        assert cache_env.cached_percent(node, theirs) == 0.0
        assert cache_env.cached_percent(node, [k for k in keys if owner[k] == node]) == 100.0
    assert cluster.free(files).complete


def test_reference_counted_free(cache_env: CacheEnv, bucket: str, tmp_path: Path, make_config: MakeConfig) -> None:
    keys = cache_env.make_files(bucket, {"d/shared": 128 * KIB, "d/only-a": 128 * KIB, "d/only-b": 128 * KIB})
    shared, only_a, only_b = keys
    cfg = make_config(cache_env.cache, tmp_path, [bucket])
    list_a = write_list(tmp_path, [shared, only_a], "a.txt")
    list_b = write_list(tmp_path, [shared, only_b], "b.txt")
    quiet = Progress(render="none")
    assert run_prewarm(site(cfg, "dca"), Request(str(list_a), "ds-a", "1"), progress=quiet).complete
    assert run_prewarm(site(cfg, "dca"), Request(str(list_b), "ds-b", "1"), progress=quiet).complete

    freed = free_list(site(cfg, "dca"), Request(str(list_a), "ds-a", "1"))
    assert freed.kept == {shared: ["ds-b@1"]}
    status = {f.bucket_key: f.status for f in check_list(site(cfg, "dca"), Request(str(write_list(tmp_path, keys, "all.txt")))).files}
    assert status == {shared: FileStatus.CACHED, only_a: FileStatus.NOT_CACHED, only_b: FileStatus.CACHED}
    for node in cache_env.cluster().nodes:
        assert [cache_env.cached_percent(node, [k]) for k in keys] == [100.0, 0.0, 100.0]

    forced = free_list(site(cfg, "dca"), Request(str(list_b)), force=True)  # no dataset named: ds-b stays active, force wins
    assert forced.forced == {shared: ["ds-b@1"], only_b: ["ds-b@1"]} and forced.complete
    status = {f.bucket_key: f.status for f in check_list(site(cfg, "dca"), Request(str(tmp_path / "all.txt"))).files}
    assert set(status.values()) == {FileStatus.NOT_CACHED}
    for node in cache_env.cluster().nodes:
        assert cache_env.cached_percent(node, keys) == 0.0


def test_cli_prewarm_of_an_mmdet3d_v2_index_with_roots(
    cache_env: CacheEnv, bucket: str, tmp_path: Path, make_config: MakeConfig, capsys: pytest.CaptureFixture[str],
) -> None:
    """`xdc prewarm plan|run --list infos.pkl --root ...` on the real cluster: the v2 index's
    relative file names are joined to the per-modality roots, found in the volume, warmed and
    checked; an entry outside every route is reported, not dropped silently."""
    doc, placed = nuscenes_v2_infos(2, sweeps=1)
    doc["data_list"][1]["lidar_sweeps"][0]["lidar_points"]["lidar_path"] = "s3://elsewhere-bkt/sweeps/x.bin"
    placed["sweeps/LIDAR_TOP"].pop()  # that sweep is not ours
    keys = cache_env.make_files(bucket, {k: 20 * KIB for k in under("nuscenes", placed)})
    infos = tmp_path / "nuscenes_infos_train.pkl"
    infos.write_bytes(pickle.dumps(doc, protocol=4))
    cfg_file = write_config(make_config(cache_env.cache, tmp_path, [bucket]), tmp_path / "xdc.yaml")
    roots = ["--root", f"s3://{bucket}/nuscenes", "--root", "pts=samples/LIDAR_TOP", "--root", "sweeps=sweeps/LIDAR_TOP",
             *[a for c in CAMS for a in ("--root", f"{c}=samples/{c}")]]

    assert cli_main(["--config", str(cfg_file), "prewarm", "plan", "--list", str(infos), *roots]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["list"]["shape"] == "mmdet3d-v2" and plan["list"]["selector"].startswith("data_list[].[{pts:")
    assert (plan["files"], plan["missing_files"], plan["rejected_count"]) == (len(keys), 0, 1)
    assert "elsewhere-bkt/sweeps/x.bin" in plan["rejected"][0]["reason"] and "no route" in plan["rejected"][0]["reason"]

    assert cli_main(["--config", str(cfg_file), "prewarm", "run", "--no-wait", "--list", str(infos), *roots]) == 1
    report = json.loads(capsys.readouterr().out)  # exit 1: the rejected entry is not cached
    assert report["check"]["counts"] == {"cached": len(keys), "partial": 0, "not_cached": 0, "missing": 0}
    assert [(d["entry"], d["reason"][:7]) for d in report["not_cached"]] == [("elsewhere-bkt/sweeps/x.bin", "line 2:")]
    check = cache_env.cluster().check(files_of(keys))
    assert check.complete
    assert [cache_env.cached_percent(n, keys) for n in cache_env.cluster().nodes] == [100.0, 100.0]
    assert cache_env.cluster().free(files_of(keys)).complete
