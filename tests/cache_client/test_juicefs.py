"""What is JuiceFS's own in the JuiceFS backend, on real mounts (two nodes of one volume): block
lists from dump and info, capacity from the node's cache size, the check at scale. The flows every
backend shares (plan, prewarm, check, free, reference-counted free) are in test_backends.py."""
from __future__ import annotations

import json
import os
import posixpath
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cache_client.base import CacheFile, FileStatus
from cache_client.juicefs import JuiceFSCluster, run_juicefs
from cache_client.prewarm import pipeline
from cache_client.prewarm.pipeline import (
    Request,
    check_list,
    plan_prewarm,
    run_prewarm,
    to_cache_file,
)
from cache_client.prewarm.progress import Progress
from tests.mirror.chaos_support import write_config
from tests.support import site
from xdc.app.cli import main as cli_main
from xdc.config import CacheConfig, XdcConfig, parse_config
from xdc.errors import CapacityError

MakeFiles = Callable[[str, dict[str, int]], list[str]]
MakeConfig = Callable[..., XdcConfig]

KIB = 1024
MIB = 1 << 20


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


# -- watermarks: room made from retired datasets only ------------------------------------------------
def with_watermarks(cfg: XdcConfig, marks: dict[str, tuple[float, float]]) -> XdcConfig:
    """The same config (same state) with per-node watermarks."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    for n in data["datacenters"]["dca"]["cache"]["nodes"]:
        n["high_watermark"], n["low_watermark"] = marks[n["name"]]
    return parse_config(data, base_dir=cfg.base_dir)


def test_make_room_on_real_mounts_frees_only_retired_datasets_files(
    jfs_cache: CacheConfig, bucket: str, make_files: MakeFiles, tmp_path: Path, make_config: MakeConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two retired datasets and an active one share the cache; a warm that would pass the nodes'
    high watermark is refused naming the oldest retired dataset, and `--make-room` evicts exactly its
    files that no active dataset uses. Watermarks are set from the nodes' measured fill (other tests
    leave blocks in the session's cache)."""
    sizes = {f"old/{i}": MIB for i in range(4)} | {"shared/0": MIB, "mid/0": MIB, "keep/0": MIB}
    sizes |= {f"new/{i}": MIB for i in range(3)}
    keys = make_files(bucket, sizes)
    by = {k.split("/", 1)[1]: k for k in keys}
    old = [by[f"old/{i}"] for i in range(4)] + [by["shared/0"]]
    keep, mid, new = [by["shared/0"], by["keep/0"]], [by["mid/0"]], [by[f"new/{i}"] for i in range(3)]
    cfg = make_config(jfs_cache, tmp_path, [bucket])
    quiet = Progress(render="none")
    for name, ks in (("old", old), ("mid", mid), ("keep", keep)):
        rep = run_prewarm(site(cfg, "dca"), Request(str(write_list(tmp_path, ks, f"{name}.txt")), name, "1"),
                          progress=quiet)
        assert rep.complete, (rep.summary(), rep.not_cached)
    assert cli_main(["--config", str(write_config(cfg, tmp_path / "xdc.yaml")), "prewarm", "retire", "--dataset", "old",
                     "--version", "1"]) == 0
    time.sleep(0.05)
    pipeline.retire(site(cfg, "dca"), "mid", "1")  # retired after old: old goes first

    cluster = JuiceFSCluster(jfs_cache)
    marks = {}
    for n in cluster.nodes:
        used, cap = cluster.usage(n)
        # the 3 MiB warm passes high by 0.5 MiB; under low needs 3.5 MiB freed: old's 4 own MiB do it
        marks[n] = ((used + 2.5 * MIB) / cap, (used - 0.5 * MIB) / cap)
    wcfg = with_watermarks(cfg, marks)
    cfg_file = write_config(wcfg, tmp_path / "xdc-marks.yaml")
    new_list = write_list(tmp_path, new, "new.txt")
    args = ["--config", str(cfg_file), "prewarm"]

    capsys.readouterr()
    assert cli_main([*args, "plan", "--list", str(new_list), "--dataset", "new", "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "plan passes the high watermark" in err and "freeing old@1 4.0 MiB leaves it" in err and "mid@1" not in err
    code = cli_main([*args, "run", "--list", str(new_list), "--dataset", "new", "--version", "1", "--make-room"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["plan"]["room"]["made"] and [d["dataset"] for d in report["plan"]["room"]["datasets"]] == ["old"]

    everything = write_list(tmp_path, keys, "all.txt")
    status = {f.bucket_key: f.status for f in check_list(site(wcfg, "dca"), Request(str(everything))).files}
    gone = {k for k, s in status.items() if s is FileStatus.NOT_CACHED}
    assert gone == {by[f"old/{i}"] for i in range(4)}, status  # old's own files, on every node
    assert all(status[k] is FileStatus.CACHED for k in [*keep, *mid, *new])  # shared (keep is active), mid, new
    ev = site(wcfg, "dca").state.prewarm.evictions()
    assert sorted((e["dataset"], e["node"], e["files"]) for e in ev) == [("old", n, 4) for n in cluster.nodes]
    cluster.free(files_of(keys))
