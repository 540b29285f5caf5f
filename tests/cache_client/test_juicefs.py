"""The JuiceFS backend and the prewarm flow on real mounts (two nodes of one volume)."""
from __future__ import annotations

import json
import os
import pickle
import posixpath
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cache_client.base import CacheFile, FileStatus
from cache_client.juicefs import JuiceFSCluster, run_juicefs
from cache_client.placement import BalancedPlacement
from cache_client.prewarm.pipeline import (
    Request,
    check_list,
    free_list,
    plan_prewarm,
    run_prewarm,
    to_cache_file,
    wait_ready,
)
from cache_client.prewarm.progress import Progress
from tests.cache_client.indexes import CAMS, nuscenes_v2_infos, under
from tests.mirror.chaos_support import write_config
from tests.support import site
from xdc.app.cli import main as cli_main
from xdc.config import CacheConfig, XdcConfig
from xdc.errors import CapacityError, NotReadyError

MakeFiles = Callable[[str, dict[str, int]], list[str]]
MakeConfig = Callable[..., XdcConfig]

KIB = 1024
MIB = 1 << 20
SIZES = {"a/one": 300 * KIB, "a/two": 300 * KIB, "b/three": 5 * MIB + 123, "b/tiny": 100, "c/empty": 0}


def files_of(keys: list[str]) -> list[CacheFile]:
    return [to_cache_file(k, "") for k in keys]


def write_list(tmp_path: Path, keys: list[str], name: str = "list.txt") -> Path:
    p = tmp_path / name
    p.write_text("".join(k + "\n" for k in keys))
    return p


def juicefs_check_ratio(node_mount: Path, keys: list[str]) -> str:
    """What `juicefs warmup --check` says (stderr summary line), to cross-check our per-file view."""
    lst = node_mount.parent / "check-list.txt"
    lst.write_text("".join(str(node_mount / k) + "\n" for k in keys))
    cp = run_juicefs(["warmup", "--check", "-f", str(lst)])
    m = re.search(r"check cache: (\d+) files checked, .* \(([\d.]+)%\) cached", cp.stderr)
    assert m, cp.stderr
    return m.group(2)


def test_plan_warm_check_rerun_free(jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles) -> None:
    keys = make_files(bucket, SIZES)
    cluster = JuiceFSCluster(jfs_cache)
    files = files_of(keys)
    total = sum(SIZES.values())

    plan = cluster.plan(files)
    assert (plan.files, plan.bytes, plan.cached_files, plan.missing) == (5, total, 1, [])  # the empty file is trivially cached
    assert {n: (len(s.files), s.bytes) for n, s in plan.shares.items()} == {"node1": (4, total), "node2": (4, total)}
    assert plan.warm_bytes == 2 * total and plan.eta_seconds > 0  # the empty file needs no load

    progress = Progress(plan.bandwidth, render="none")
    report = cluster.warm(plan, progress)
    assert not report.errors
    assert progress.snapshot().bytes_done == 2 * total and progress.snapshot().files_done == 8

    check = cluster.check(files)
    assert check.complete and check.cached_ratio == 1.0, check.to_dict()
    assert all(f.cached == {"node1": f.size, "node2": f.size} for f in check.files)
    for n in jfs_cache.nodes:  # JuiceFS's own aggregate agrees
        assert juicefs_check_ratio(Path(n.mount), keys) == "100.0"

    again = cluster.plan(files)
    assert again.noop and again.cached_files == 5 and again.cached_bytes == total

    freed = cluster.free(files)
    assert freed.complete and freed.freed_bytes == {"node1": total, "node2": total}
    after = cluster.check(files)
    assert [f.status for f in after.files] == [FileStatus.NOT_CACHED] * 4 + [FileStatus.CACHED]  # empty file
    for n in jfs_cache.nodes:
        assert juicefs_check_ratio(Path(n.mount), keys) == "0.0"


def test_block_lists_from_dump_and_info_agree(jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles) -> None:
    sizes = {f"d/{i}": 1000 * i for i in range(9)} | {"d/multi": 9 * MIB + 5, "d/over": 2 * MIB}
    keys = make_files(bucket, sizes)
    with open(Path(jfs_cache.nodes[0].mount) / bucket / "d/over", "r+b") as fh:  # a range written twice
        fh.seek(MIB)
        fh.write(b"x" * 10)
    cluster = JuiceFSCluster(jfs_cache)
    files = files_of(keys)
    dumped = {}
    for d in {posixpath.dirname(f.path) for f in files}:
        dumped |= cluster._dump_dir(d)
    via_info = cluster._info_blocks(files)
    over = f"{bucket}/d/over"
    assert over not in dumped  # overlapping slices: left to `juicefs info`
    for f in files:
        if f.path != over:
            assert dumped[f.path] == via_info[f.path], f.path
    assert sum(n for _, n in via_info[f"{bucket}/d/multi"]) == 9 * MIB + 5
    assert sum(n for _, n in via_info[over]) == 2 * MIB
    assert cluster._blocks(files) == via_info


def test_run_prewarm_reports_missing_and_survives_first_missing_quirk(
    jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles, tmp_path: Path, make_config: MakeConfig
) -> None:
    keys = make_files(bucket, {"x/1": 200 * KIB, "x/2": 200 * KIB})
    # The missing key comes FIRST: passed to `juicefs warmup` as is, this is a FATAL exit 1.
    lst = write_list(tmp_path, [f"{bucket}/x/nope", *keys, "not a key/"])
    cfg = make_config(jfs_cache, tmp_path, [bucket])
    report = run_prewarm(site(cfg, "dca"), Request(str(lst)), progress=Progress(render="none"), wait=False)
    assert not report.complete
    assert report.check.counts == {"cached": 2, "partial": 0, "not_cached": 0, "missing": 1}
    reasons = {d.get("bucket_key", d.get("entry")): d["reason"] for d in report.not_cached}
    assert reasons[f"{bucket}/x/nope"] == "not in this datacenter's volume"
    assert len(reasons) == 2  # + the unreadable line
    assert report.to_dict()["plan"]["missing"] == [f"{bucket}/x/nope"]
    runs = site(cfg, "dca").state.prewarm.runs(min_seconds=0)  # the run's bandwidth was recorded
    assert [(b, f) for b, f, _ in runs] == [(800 * KIB, 4)]

    checked = check_list(site(cfg, "dca"), Request(str(lst)))
    assert checked.counts["cached"] == 2 and checked.rejected

    with pytest.raises(NotReadyError) as exc:
        wait_ready(site(cfg, "dca"), [to_cache_file(k, "") for k in [*keys, f"{bucket}/x/nope"]], timeout=0, poll=0.1)
    assert exc.value.missing == [f"{bucket}/x/nope"]  # type: ignore[attr-defined]
    free_list(site(cfg, "dca"), Request(str(lst)), force=True)


def test_warm_survives_a_file_vanishing_before_warmup(jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles) -> None:
    keys = make_files(bucket, {"v/gone": 10 * KIB, "v/kept": 10 * KIB})
    cluster = JuiceFSCluster(jfs_cache)
    files = [CacheFile(f.bucket_key, f.path, 10 * KIB) for f in files_of(keys)]
    (Path(jfs_cache.nodes[0].mount) / files[0].path).unlink()  # after the plan's stat, first in the list
    done: list[tuple[int, int]] = []
    cluster.warm_node("node1", files, 2, lambda f, b: done.append((f, b)))
    assert sum(f for f, _ in done) == 2  # both accounted for, no FATAL
    assert cluster.cached_bytes("node1", files[1:]) == {files[1].path: 10 * KIB}
    cluster.free(files[1:])


def test_shard_placement_warms_each_file_on_its_owner_only(
    jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles
) -> None:
    keys = make_files(bucket, {f"s/{i}": 64 * KIB for i in range(12)})
    cache = jfs_cache.model_copy(update={"placement": "shard"})
    cluster = JuiceFSCluster(cache)
    files = files_of(keys)
    plan = cluster.plan(files)
    placed = BalancedPlacement(cluster.nodes).assign(keys, [64 * KIB] * len(keys))
    owner = {k: n for n, ks in placed.items() for k in ks}
    assert {n: sorted(f.bucket_key for f in s.files) for n, s in plan.shares.items()} == {
        n: sorted(ks) for n, ks in placed.items()
    }
    assert {n: len(ks) for n, ks in placed.items()} == {"node1": 6, "node2": 6}  # balanced
    cluster.warm(plan)
    check = cluster.check(files)
    assert check.complete
    for f in check.files:
        assert list(f.cached) == [owner[f.bucket_key]]
    for node in cluster.nodes:  # and nothing on the other node
        theirs = [f for f in files if owner[f.bucket_key] != node]
        assert sum(cluster.cached_bytes(node, theirs).values()) == 0
    cluster.free(files)


def test_reference_counted_free(jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles, tmp_path: Path, make_config: MakeConfig) -> None:
    keys = make_files(bucket, {"d/shared": 128 * KIB, "d/only-a": 128 * KIB, "d/only-b": 128 * KIB})
    shared, only_a, only_b = keys
    cfg = make_config(jfs_cache, tmp_path, [bucket])
    list_a = write_list(tmp_path, [shared, only_a], "a.txt")
    list_b = write_list(tmp_path, [shared, only_b], "b.txt")
    quiet = Progress(render="none")
    assert run_prewarm(site(cfg, "dca"), Request(str(list_a), "ds-a", "1"), progress=quiet).complete
    assert run_prewarm(site(cfg, "dca"), Request(str(list_b), "ds-b", "1"), progress=quiet).complete

    freed = free_list(site(cfg, "dca"), Request(str(list_a), "ds-a", "1"))
    assert freed.kept == {shared: ["ds-b@1"]}
    status = {f.bucket_key: f.status for f in check_list(site(cfg, "dca"), Request(str(write_list(tmp_path, keys, "all.txt")))).files}
    assert status == {shared: FileStatus.CACHED, only_a: FileStatus.NOT_CACHED, only_b: FileStatus.CACHED}

    forced = free_list(site(cfg, "dca"), Request(str(list_b)), force=True)  # no dataset named: ds-b stays active, force wins
    assert forced.forced == {shared: ["ds-b@1"], only_b: ["ds-b@1"]} and forced.complete
    status = {f.bucket_key: f.status for f in check_list(site(cfg, "dca"), Request(str(tmp_path / "all.txt"))).files}
    assert set(status.values()) == {FileStatus.NOT_CACHED}


def test_capacity_refused_or_trimmed(jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles, tmp_path: Path, make_config: MakeConfig) -> None:
    keys = make_files(bucket, {f"big/{i}": 600 * KIB for i in range(4)})

    def sized(mib: int) -> CacheConfig:
        return jfs_cache.model_copy(update={"nodes": [n.model_copy(update={"cache_size_mib": mib}) for n in jfs_cache.nodes]})

    with pytest.raises(CapacityError, match=r"node1: needs 2\.3 MiB, free .* \(capacity 1\.0 MiB, used"):
        JuiceFSCluster(sized(1)).plan(files_of(keys))
    small = sized(2)
    used, capacity = JuiceFSCluster(small).usage("node1")  # other tests' leftovers may use some
    cfg = make_config(small, tmp_path, [bucket])
    plan = plan_prewarm(site(cfg, "dca"), Request(str(write_list(tmp_path, keys))), trim=True)
    fits = (capacity - used) // (600 * KIB)  # files are whole pages: 600 KiB each
    assert fits < 4
    assert plan.trimmed and len(plan.shares["node1"].files) == fits and len(plan.shares["node1"].dropped) == 4 - fits
    assert plan.to_dict()["nodes"]["node1"]["dropped"] == 4 - fits


def test_slice_blocks_and_info_parsing_pure() -> None:
    from cache_client.juicefs import parse_info_objects, slice_blocks

    block = 4 * MIB
    # 9 MiB + 5 slice: three blocks; a file using bytes [1 MiB, 9 MiB + 5) of it, then a hole
    chunks = [{"index": 0, "slices": [{"id": 1234567, "size": 9 * MIB + 5, "off": MIB, "len": 8 * MIB + 5},
                                      {"id": 0, "pos": 8 * MIB + 5, "len": 100}]}]
    assert slice_blocks(chunks, block) == [
        ("chunks/1/1234/1234567_0_4194304", 3 * MIB),
        ("chunks/1/1234/1234567_1_4194304", 4 * MIB),
        ("chunks/1/1234/1234567_2_1048581", MIB + 5),
    ]
    overlapping = [{"index": 0, "slices": [{"id": 1, "size": 10, "len": 10}, {"id": 2, "pos": 5, "size": 1, "len": 1}]}]
    assert slice_blocks(overlapping, block) is None
    text = """/m/b/x :
  inode: 4
 objects:
+------------+----------------------------+---------+--------+---------+-----+
| chunkIndex |         objectName         |   size  | offset |  length | pos |
+------------+----------------------------+---------+--------+---------+-----+
|          0 | vol/chunks/0/0/1_0_1048576 | 1048576 |      0 | 1048576 |   0 |
+------------+----------------------------+---------+--------+---------+-----+
/m/b/empty :
  inode: 5
"""
    assert parse_info_objects(text) == {"/m/b/x": [("vol/chunks/0/0/1_0_1048576", 1048576)], "/m/b/empty": []}


def test_cli_prewarm_of_an_mmdet3d_v2_index_with_roots(
    jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles, tmp_path: Path, make_config: MakeConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`xdc prewarm plan|run --list infos.pkl --root ...` on the real mounts: the v2 index's
    relative file names are joined to the per-modality roots, found in the volume, warmed and
    checked; an entry outside every route is reported, not dropped silently."""
    doc, placed = nuscenes_v2_infos(2, sweeps=1)
    doc["data_list"][1]["lidar_sweeps"][0]["lidar_points"]["lidar_path"] = "s3://elsewhere-bkt/sweeps/x.bin"
    placed["sweeps/LIDAR_TOP"].pop()  # that sweep is not ours
    keys = make_files(bucket, {k: 20 * KIB for k in under("nuscenes", placed)})
    infos = tmp_path / "nuscenes_infos_train.pkl"
    infos.write_bytes(pickle.dumps(doc, protocol=4))
    cfg_file = write_config(make_config(jfs_cache, tmp_path, [bucket]), tmp_path / "xdc.yaml")
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
    check = JuiceFSCluster(jfs_cache).check(files_of(keys))
    assert check.complete
    JuiceFSCluster(jfs_cache).free(files_of(keys))


# -- the check at scale: one dump + one listing, same answers as the per-file check ------------------

def old_check(cluster: JuiceFSCluster, node: str, files: list[CacheFile]) -> dict[str, int]:
    """Today's per-file answer, kept as the oracle: block lists per directory / per file, then
    one exists() per block in the node's cache dir."""
    root = Path(cluster.node_cfg[node].cache_dir) / cluster._volume_uuid(node) / "raw"
    blocks = cluster._blocks(files)
    return {f.path: sum(n for obj, n in blocks[f.path] if (root / obj).exists()) for f in files}


def settled(cluster: JuiceFSCluster, files: list[CacheFile], timeout: float = 20) -> None:
    """Wait until the nodes' caches stop changing: a read through a mount writes its blocks to the
    cache dir in the background, a moment later."""
    last: object = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = [sorted(os.listdir(p)) for n in cluster.nodes for p, _, _ in os.walk(cluster.node_cfg[n].cache_dir)]
        if now == last:
            return
        last = now
        time.sleep(0.5)


def _read(mount: str | Path, rel: str, nbytes: int | None = None) -> None:
    with open(Path(mount) / rel, "rb") as fh:
        fh.read(nbytes) if nbytes is not None else fh.read()


@pytest.mark.parametrize("dump", ["binary", "json"])
def test_scaled_check_matches_the_per_file_check(
    jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles, dump: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both metadata sources (whole-volume binary dump, streamed JSON dump of the top directory)
    give the per-file check's answers on files cached whole, partly, not at all, empty, with
    overwritten ranges, on two nodes."""
    from cache_client import juicefs as jfs_mod

    monkeypatch.setattr(jfs_mod, "BINARY_MAX_FACTOR", 10**9 if dump == "binary" else 0)
    used: list[str] = []
    for cls in (jfs_mod.BinaryScan, jfs_mod.DumpScan):
        real = cls.run
        monkeypatch.setattr(cls, "run", lambda self, real=real, name=cls.__name__: (used.append(name), real(self))[1])
    sizes = {f"cams/front/{i:04d}.jpg": 40 * KIB + i for i in range(30)}
    sizes |= {f"lidar/top/sub/{i:03d}.bin": 9 * KIB for i in range(12)}
    sizes |= {"lidar/big.bin": 9 * MIB + 7, "lidar/over.bin": 2 * MIB, "cams/empty.jpg": 0, "cams/odd name \u00e9.jpg": 5000}
    keys = make_files(bucket, sizes)
    m1, m2 = (Path(n.mount) for n in jfs_cache.nodes)
    with open(m1 / bucket / "lidar/over.bin", "r+b") as fh:  # a range written twice: overlapping slices
        fh.seek(MIB)
        fh.write(b"y" * 100)
    cluster = JuiceFSCluster(jfs_cache)
    cluster.free(files_of(keys))
    # node1: every other front frame, the whole big file, the odd name; node2: the first MiB of big, the sweeps
    for k in [k for k in sizes if k.startswith("cams/front/")][::2] + ["lidar/big.bin", "cams/odd name \u00e9.jpg", "lidar/over.bin"]:
        _read(m1 / bucket, k)
    _read(m2 / bucket, "lidar/big.bin", MIB)
    for k in [k for k in sizes if k.startswith("lidar/top/")]:
        _read(m2 / bucket, k)
    files = [CacheFile(f.bucket_key, f.path, sizes[f.path.split("/", 1)[1]]) for f in files_of(keys)]
    settled(cluster, files)
    used.clear()
    new = cluster.cached_bytes_nodes({"node1": files, "node2": files})
    assert used == ["BinaryScan" if dump == "binary" else "DumpScan"]  # one dump for both nodes
    for node in ("node1", "node2"):
        assert new[node] == old_check(cluster, node, files), node
    # and against what the test did, independently of both
    assert new["node1"][f"{bucket}/lidar/big.bin"] == 9 * MIB + 7
    assert 0 < new["node2"][f"{bucket}/lidar/big.bin"] < 9 * MIB + 7  # the first block(s): read-ahead decides
    assert new["node1"][f"{bucket}/cams/front/0000.jpg"] == 40 * KIB and new["node1"][f"{bucket}/cams/front/0001.jpg"] == 0
    assert new["node1"][f"{bucket}/lidar/over.bin"] == 2 * MIB  # settled by `juicefs info`
    assert all(new["node2"][f"{bucket}/lidar/top/sub/{i:03d}.bin"] == 9 * KIB for i in range(12))
    assert new["node2"][f"{bucket}/cams/empty.jpg"] == 0
    # JuiceFS's own aggregate agrees with the sum (without over.bin: --check counts the bytes of
    # both its slices, 4 MiB "of 4 MiB", where the file holds 2 MiB)
    plain = [f for f in files if not f.path.endswith("over.bin")]
    total = sum(f.size or 0 for f in plain)
    for n in jfs_cache.nodes:
        ours = 100 * sum(new[n.name][f.path] for f in plain) / total
        assert abs(float(juicefs_check_ratio(Path(n.mount), [f.path for f in plain])) - ours) <= 0.05 + 1e-9, n.name
    cluster.free(files)


def test_scaled_check_falls_back_when_the_directory_is_mostly_other_files(
    jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cache_client import juicefs as jfs_mod

    keys = make_files(bucket, {f"many/{i:04d}": 3000 for i in range(120)})
    cluster = JuiceFSCluster(jfs_cache)
    listed = files_of(keys[:40])
    for f in listed[::3]:
        _read(jfs_cache.nodes[0].mount, f.path)
    settled(cluster, listed)
    stopped: list[int] = []
    real = jfs_mod.DumpScan.run

    def run(self: jfs_mod.DumpScan) -> None:
        try:
            real(self)
        except jfs_mod.DumpTooLarge:
            stopped.append(self.entries)
            raise

    monkeypatch.setattr(jfs_mod, "BINARY_MAX_FACTOR", 0)  # the JSON dump of the top directory
    monkeypatch.setattr(jfs_mod, "DUMP_MAX_MIN", 10)
    monkeypatch.setattr(jfs_mod, "DUMP_MAX_FACTOR", 2)
    monkeypatch.setattr(jfs_mod.DumpScan, "run", run)
    got = cluster.cached_bytes("node1", listed)
    assert stopped == [81]  # stopped after 2 x 40 + 1 entries, then per directory
    assert got == old_check(cluster, "node1", listed)
    assert sorted(p for p, b in got.items() if b) == sorted(f.path for f in listed[::3])
    cluster.free(files_of(keys))


def test_dump_parser_on_names_that_look_like_its_own_fields(tmp_path: Path) -> None:
    """Pure: directories named "entries"/"attr", quotes and backslashes in names, a hole, trash."""
    from cache_client.juicefs_scan import DumpScan

    dump = tmp_path / "dump.json"
    dump.write_text('''{
  "Setting": {
    "Name": "v",
    "BlockSize": 4096,
    "Tiers": {
      "0": {"ID": 0}
    }
  },
  "Counters": {"usedSpace": 0},
  "FSTree": {
    "attr": {"inode":1,"type":"directory","length":0},
    "entries": {
      "entries": {
        "attr": {"inode":2,"type":"directory","length":0},
        "entries": {
          "attr": {
            "attr": {"inode":3,"type":"regular","length":5},
            "chunks": [{"index":0,"slices":[{"id":7,"size":5,"len":5}]}]
          },
          "q\\"b\\\\s": {
            "attr": {"inode":4,"type":"regular","length":4194404},
            "chunks": [{"index":0,"slices":[{"id":0,"len":100},{"id":8,"size":4194304,"pos":100,"len":4194304}]}]
          }
        }
      }
    }
  },
  "Trash": {
    "entries": {
      "x": {
        "attr": {"inode":9,"type":"regular","length":1},
        "chunks": [{"index":0,"slices":[{"id":9,"size":1,"len":1}]}]
      }
    }
  }
}
''')
    got: dict[str, object] = {}
    scan = DumpScan("cat", "unused", "", {"entries/attr": 1, 'entries/q"b\\s': 1, "x": 1}, got.__setitem__)
    scan.cmd = ["cat", str(dump)]
    scan.run()
    assert got == {"entries/attr": [("7_0_5", 5)], 'entries/q"b\\s': [("8_0_4194304", 4194304)]}
    assert scan.entries == 3


def test_an_unknown_binary_dump_layout_falls_back_to_the_json_dump(
    jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cache_client import juicefs as jfs_mod
    from cache_client import juicefs_scan

    keys = make_files(bucket, {f"fb/{i:03d}": 2000 for i in range(40)})
    files = files_of(keys)
    cluster = JuiceFSCluster(jfs_cache)
    for f in files[:10]:
        _read(jfs_cache.nodes[0].mount, f.path)
    settled(cluster, files)
    monkeypatch.setattr(jfs_mod, "BINARY_MAX_FACTOR", 10**9)
    monkeypatch.setattr(juicefs_scan, "_EOS", 0xDEAD)  # every real dump now looks truncated
    got = cluster.cached_bytes("node1", files)
    assert got == old_check(cluster, "node1", files)
    assert sorted(p for p, b in got.items() if b) == sorted(f.path for f in files[:10])
    cluster.free(files)
