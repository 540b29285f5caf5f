"""Per-file cache check at scale on real JuiceFS mounts (run by hand, as root: FUSE).

    python bench/check.py [--files 200000] [--per-dir 1000] [--size 1024] [--sample 2000] [--dir DIR]

Builds a real JuiceFS volume of --files files (sqlite metadata, file object storage): the metadata
is written with `juicefs load` (a dump generated here: creating 200,000 files through FUSE takes
minutes) and the blocks are written where JuiceFS's file storage keeps them; a sample is read back
through a mount and compared byte for byte. Two nodes mount it with their own cache dirs; `juicefs
warmup` warms half of the directories on node1 and a quarter on node2.

Then it times:
    new        JuiceFSCluster.cached_bytes_nodes: one metadata dump (here the binary dump of the
               whole volume) + one cache listing per node, both nodes at once
    new-json   the same with the streamed JSON dump of the list's top directory (what a volume
               much larger than the list gets)
    check      JuiceFSCluster.check: `new` plus stat of every file through FUSE and placement
    old        today's per-file answer on a random sample (--sample): block lists from `juicefs
               dump --subdir` per directory / `juicefs info`, then one exists() per block
and prints files checked per second per node for each (each node's N files are checked in the
time shown), wall and CPU seconds (this process + the juicefs processes it ran; on a shared
machine CPU is the fair figure), the ratio to the old check, and whether the new answers equal
the old ones on the sample (they must). Goal: new >= 20,000 files/s per node.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cache_client.base import CacheFile
from cache_client.juicefs import (
    JuiceFSCluster,
    format_volume,
    juicefs_bin,
    mount_node,
    umount_node,
)
from xdc.config import CacheConfig, CacheNode

BUCKET = "bench"


def run(args: list[str]) -> str:
    cp = subprocess.run([juicefs_bin(), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if cp.returncode:
        raise SystemExit(f"juicefs {args[0]} failed: {cp.stderr[-2000:]}")
    return cp.stdout


def build_volume(base: Path, files: int, per_dir: int, size: int) -> tuple[str, list[str]]:
    """A volume of `files` files of `size` bytes under bench/dNNNNN/; returns (meta url, paths)."""
    data = base / "data"
    tmpl_meta = f"sqlite3://{base}/template.db"
    format_volume(tmpl_meta, data, "checkbench")
    template = json.loads(run(["dump", tmpl_meta]))
    name = template["Setting"]["Name"]
    now = int(time.time())

    def attr(inode: int, kind: str, length: int, nlink: int) -> dict[str, object]:
        return {"inode": inode, "type": kind, "mode": 0o644 if kind == "regular" else 0o755, "uid": 0, "gid": 0,
                "atime": now, "mtime": now, "ctime": now, "atimensec": 0, "mtimensec": 0, "ctimensec": 0,
                "nlink": nlink, "length": length}

    dirs = -(-files // per_dir)
    inode = 2
    bucket_inode = inode
    inode += 1
    tree: dict[str, object] = {}
    paths: list[str] = []
    sid = 0
    chunk_root = data / name / "chunks"
    payload = os.urandom(size)
    for d in range(dirs):
        dname = f"d{d:05d}"
        dino = inode
        inode += 1
        entries: dict[str, object] = {}
        for i in range(min(per_dir, files - d * per_dir)):
            sid += 1
            fname = f"f{i:05d}.bin"
            entries[fname] = {"attr": attr(inode, "regular", size, 1),
                              "chunks": [{"index": 0, "slices": [{"id": sid, "size": size, "len": size}]}]}
            inode += 1
            obj = chunk_root / str(sid // 1_000_000) / str(sid // 1000) / f"{sid}_0_{size}"
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(sid.to_bytes(8, "big") + payload[8:])  # each file's bytes differ
            paths.append(f"{BUCKET}/{dname}/{fname}")
        tree[dname] = {"attr": attr(dino, "directory", 0, 2), "entries": entries}
    template["FSTree"]["attr"]["nlink"] = 3
    template["FSTree"]["entries"] = {BUCKET: {"attr": attr(bucket_inode, "directory", 0, 2 + dirs), "entries": tree}}
    template["Counters"].update({"usedSpace": files * ((size + 4095) // 4096 * 4096), "usedInodes": inode - 2,
                                 "nextInodes": inode + 1, "nextChunk": sid + 1})
    dump = base / "volume.json"
    dump.write_text(json.dumps(template))
    meta = f"sqlite3://{base}/meta.db"
    run(["load", meta, str(dump)])
    dump.unlink()
    return meta, paths


def cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def old_check(cluster: JuiceFSCluster, node: str, files: list[CacheFile]) -> dict[str, int]:
    """The per-file check as it was: block lists per directory (dump) or per file (info), then one
    exists() per block in the node's cache dir."""
    root = Path(cluster.node_cfg[node].cache_dir) / cluster._volume_uuid(node) / "raw"
    blocks = cluster._blocks(files)
    return {f.path: sum(n for obj, n in blocks[f.path] if (root / obj).exists()) for f in files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--per-dir", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1024, help="bytes per file")
    ap.add_argument("--sample", type=int, default=2000, help="files the old check is timed and compared on")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the volume (default: a temp dir)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"seed {args.seed}")

    base = Path(tempfile.mkdtemp(prefix="xdc-check-bench-", dir=args.dir))
    nodes: list[CacheNode] = []
    mounted: list[CacheNode] = []
    try:
        t0 = time.perf_counter()
        meta, paths = build_volume(base, args.files, args.per_dir, args.size)
        print(f"built a volume of {len(paths):,} files ({args.size} B each) in {time.perf_counter() - t0:.1f} s")
        nodes = [CacheNode(name=f"node{i}", mount=base / f"mnt{i}", cache_dir=base / f"cache{i}", cache_size_mib=8192)
                 for i in (1, 2)]
        for n in nodes:
            mount_node(meta, n)
            mounted.append(n)
        cluster = JuiceFSCluster(CacheConfig(meta_url=meta, nodes=nodes, threads_per_node=16))
        files = [CacheFile(p, p, args.size) for p in paths]
        dir_no = {d: i for i, d in enumerate(sorted({p.rsplit("/", 1)[0] for p in paths}))}
        warm1 = [f for f in files if dir_no[f.path.rsplit("/", 1)[0]] % 2 == 0]
        warm2 = [f for f in files if dir_no[f.path.rsplit("/", 1)[0]] % 4 == 1]
        payload_tail = None
        for f in rng.sample(warm1, 20):  # the volume is real: bytes read back through node1's mount
            got = (Path(nodes[0].mount) / f.path).read_bytes()
            sid = int.from_bytes(got[:8], "big")
            assert len(got) == args.size and f.path.endswith(f"f{(sid - 1) % args.per_dir:05d}.bin"), f.path
            assert payload_tail in (None, got[8:]), f.path
            payload_tail = got[8:]
        t0 = time.perf_counter()
        cluster._per_node(lambda n: cluster.warm_node(n, warm1 if n == "node1" else warm2, 16, lambda f, b: None))
        print(f"warmed {len(warm1):,} files on node1 and {len(warm2):,} on node2 with juicefs warmup in "
              f"{time.perf_counter() - t0:.1f} s")

        import cache_client.juicefs as jfs_mod

        st = os.statvfs(nodes[0].mount)
        print(f"volume inodes in use (statfs): {st.f_files - st.f_ffree:,}")
        times: dict[str, tuple[float, float]] = {}
        t0, c0 = time.perf_counter(), cpu()
        new = cluster.cached_bytes_nodes({"node1": files, "node2": files})
        times["new"] = (time.perf_counter() - t0, cpu() - c0)
        cached = {n: sum(1 for b in new[n].values() if b) for n in new}
        assert cached == {"node1": len(warm1), "node2": len(warm2)}, cached
        saved = jfs_mod.BINARY_MAX_FACTOR
        jfs_mod.BINARY_MAX_FACTOR = 0
        try:
            t0, c0 = time.perf_counter(), cpu()
            new_json = cluster.cached_bytes_nodes({"node1": files, "node2": files})
            times["new-json"] = (time.perf_counter() - t0, cpu() - c0)
        finally:
            jfs_mod.BINARY_MAX_FACTOR = saved
        assert new_json == new, "the JSON and binary dumps disagree"
        t0, c0 = time.perf_counter(), cpu()
        report = cluster.check(files)
        times["check"] = (time.perf_counter() - t0, cpu() - c0)
        both, either = {f.path for f in warm1} & {f.path for f in warm2}, {f.path for f in warm1} | {f.path for f in warm2}
        # replicate placement: cached = on both nodes, partial = on one of them
        assert report.counts == {"cached": len(both), "partial": len(either) - len(both),
                                 "not_cached": len(files) - len(either), "missing": 0}, report.counts

        sample = rng.sample(files, min(args.sample, len(files)))
        t0, c0 = time.perf_counter(), cpu()
        old = {n: old_check(cluster, n, sample) for n in ("node1", "node2")}
        t_old, c_old = time.perf_counter() - t0, cpu() - c0
        same = all(old[n][f.path] == new[n][f.path] for n in old for f in sample)

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        n = len(files)
        print(f"{'check':<9} {'files':>9} {'nodes':>5} {'wall s':>8} {'cpu s':>7} {'files/s per node':>17} "
              f"{'(by cpu)':>9} {'x old':>7}")
        old_rate, old_cpu_rate = len(sample) / (t_old / 2), len(sample) / (c_old / 2)  # nodes one after the other
        for name, (secs, cpus) in times.items():
            print(f"{name:<9} {n:>9,} {2:>5} {secs:>8.2f} {cpus:>7.2f} {n / secs:>17,.0f} {n / cpus:>9,.0f} "
                  f"{(n / secs) / old_rate:>7.1f}")
        print(f"{'old':<9} {len(sample):>9,} {2:>5} {t_old:>8.2f} {c_old:>7.2f} {old_rate:>17,.0f} {old_cpu_rate:>9,.0f} "
              f"{1.0:>7.1f}   (sample)")
        print(f"new answers equal the old ones on the {len(sample):,}-file sample: {same}")
        print(f"files cached: node1 {cached['node1']:,}, node2 {cached['node2']:,}; peak RSS of this process {rss:,.0f} MiB")
        if not same:
            raise SystemExit("MISMATCH between the new and the old check")
    finally:
        for nd in mounted:
            umount_node(nd)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
