"""Read, deduplicate and shard a 10-million-key file list (run by hand).

    python bench/filelist_10m.py [--keys N] [--nodes 4] [--parquet] [--ring] [--dir DIR]

Writes the list(s) into a temporary directory, then runs each phase in its own child process so
every peak RSS belongs to that phase alone:

    baseline   iterate the raw lines of the txt file, nothing else
    read       read_file_list(dedupe=False): decode, validate, one ListEntry per key
    dedupe     read_file_list(dedupe=True), one ListEntry per key
    shard      read + dedupe (in batches) + balanced placement of every key on --nodes nodes: the
               issue's "reading, deduplicating and sharding" figure (goal < 20 s, < 1 GiB at 10 M)
    parquet    (with --parquet) the shard phase over the same keys in a Parquet list with sizes
    ring       (with --ring) the old consistent-hash ring (64 virtual nodes), for its balance

For the placements it prints the busiest node / mean (by bytes when sizes are known) and the share
of keys that move when a node is added (ideal 1/(N+1)), measured on the same keys outside the
timed part. Wall and CPU seconds are printed (CPU is the fair figure on a shared machine); peak RSS
is VmHWM of the child (ru_maxrss also counts the parent's RSS at the fork).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DUP_EVERY = 100  # every 100th line repeats the one before, so dedupe has work to do


def _key(i: int) -> str:
    return f"frames/datasets/ds-{i % 97:03d}/cam{i % 8}/frame-{i:09d}.jpg"


def write_txt(path: Path, n: int) -> None:
    with open(path, "w", buffering=1 << 20) as fh:
        chunk: list[str] = []
        for i in range(n):
            chunk.append(_key(i - 1 if i % DUP_EVERY == DUP_EVERY - 1 else i))
            if len(chunk) == 100_000:
                fh.write("\n".join(chunk) + "\n")
                chunk.clear()
        if chunk:
            fh.write("\n".join(chunk) + "\n")


def write_parquet(txt: Path, path: Path) -> None:
    """The same keys with sizes: log-normal around 300 KB (frames) with a long tail (lidar,
    4K), so the balance is measured by bytes on uneven files."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("key", pa.string()), ("size", pa.int64())])

    def table(keys: list[str]) -> pa.Table:
        return pa.table({"key": keys, "size": rng.lognormal(12.6, 1.0, len(keys)).astype(np.int64)}, schema=schema)

    with pq.ParquetWriter(path, schema) as w, open(txt) as fh:
        batch: list[str] = []
        for line in fh:
            batch.append(line.rstrip("\n"))
            if len(batch) == 500_000:
                w.write_table(table(batch))
                batch = []
        if batch:
            w.write_table(table(batch))


def run_phase(phase: str, path: Path, nodes: int) -> dict[str, object]:
    """Runs inside the child process."""
    import numpy as np

    from cache_client.filelist import read_file_list
    from cache_client.placement import BalancedPlacement, HashRing, key_hashes, loads

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru0.ru_utime + ru0.ru_stime
    t0 = time.perf_counter()
    counts: dict[str, int] = {}
    extra: dict[str, object] = {}
    if phase == "baseline":
        n = 0
        with open(path, "rb", buffering=1 << 20) as fh:
            for _ in fh:
                n += 1
    else:
        fl = read_file_list(path, dedupe=phase != "read")
        names = [f"cache-{i}" for i in range(nodes)]
        if phase in ("shard", "parquet"):
            # one array each, grown by doubling from the list's own estimate (no concatenation copy)
            h = np.empty(max(1024, fl.estimate_entries()), dtype=np.uint64)
            sz: np.ndarray | None = None
            k = 0
            for b in fl.iter_batches():
                if k + len(b) > len(h):
                    h = np.resize(h, 2 * (k + len(b)))
                    if sz is not None:
                        sz = np.resize(sz, len(h))
                h[k:k + len(b)] = key_hashes(b.keys)
                if sz is None and b.sizes[0] is not None:  # keep sizes only for a list that has them
                    sz = np.full(len(h), -1, dtype=np.int64)
                if sz is not None:
                    sz[k:k + len(b)] = np.fromiter((-1 if x is None else x for x in b.sizes), dtype=np.int64, count=len(b))
                k += len(b)
            h = h[:k]
            sz = sz[:k] if sz is not None else None
            bp = BalancedPlacement(names)
            index = bp.assign_hashes(h, sz)
            by = loads(index, nodes, sz)
            counts = dict(zip(names, by.tolist()))
            extra["by"] = "keys" if sz is None else "bytes"
            extra["busiest"] = float(by.max() / by.mean())
            t_timed = time.perf_counter() - t0
            ru = resource.getrusage(resource.RUSAGE_SELF)
            cpu_timed = ru.ru_utime + ru.ru_stime - cpu0
            more = bp.with_node("cache-new").assign_hashes(h, sz)
            moved = index != more
            extra["moved"] = float(moved.mean())
            extra["moved_to_new"] = float((more[moved] == nodes).mean()) if moved.any() else 1.0
        elif phase == "ring":
            ring = HashRing(names)
            counts = dict.fromkeys(ring.nodes, 0)
            node_for = ring.node_for
            for e in fl:
                counts[node_for(e.key)] += 1
            extra["by"] = "keys"
            extra["busiest"] = max(counts.values()) / (sum(counts.values()) / nodes)
        else:
            for _ in fl:
                pass
        s = fl.stats
        n = s.entries + s.duplicates + s.unreadable_count + s.blank
        extra |= {"entries": s.entries, "duplicates": s.duplicates, "unreadable": s.unreadable_count}
    dt = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - cpu0
    if "moved" in extra:
        dt, cpu = t_timed, cpu_timed  # the node-add comparison is not part of reading and sharding
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"phase": phase, "lines": n, "seconds": dt, "cpu": cpu, "rss_mib": _hwm_mib() or rss_kib / 1024,
            "maxrss_mib": rss_kib / 1024, "counts": counts, **extra}


def _hwm_mib() -> float | None:
    """This process's own peak RSS. ru_maxrss also counts the parent's RSS at the fork (Linux
    keeps the old address space's high-water mark across exec), VmHWM does not."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=10_000_000)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--parquet", action="store_true", help="also time a Parquet list")
    ap.add_argument("--ring", action="store_true", help="also measure the old consistent-hash ring (slow)")
    ap.add_argument("--only", help="comma-separated phases to run (baseline always runs)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the lists (default: a temp dir)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        print(json.dumps(run_phase(args.phase, args.file, args.nodes)))
        return

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="xdc-filelist-bench-") as tmp:
        txt = Path(tmp) / "list.txt"
        t0 = time.perf_counter()
        write_txt(txt, args.keys)
        print(f"wrote {args.keys:,} lines ({txt.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f} s")
        phases = [("baseline", txt), ("read", txt), ("dedupe", txt), ("shard", txt)]
        if args.parquet:
            pqf = Path(tmp) / "list.parquet"
            t0 = time.perf_counter()
            write_parquet(txt, pqf)
            print(f"wrote parquet ({pqf.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f} s")
            phases.append(("parquet", pqf))
        if args.ring:
            phases.append(("ring", txt))

        if args.only:
            wanted = {"baseline", *args.only.split(",")}
            phases = [ph for ph in phases if ph[0] in wanted]
        base_rate = None
        print(f"{'phase':<10} {'lines':>12} {'seconds':>8} {'cpu s':>7} {'keys/s':>12} {'x baseline':>10} {'peak RSS MiB':>13}"
              f" {'ru_maxrss MiB':>14}")
        for phase, path in phases:
            out = subprocess.run(
                [sys.executable, __file__, "--phase", phase, "--file", str(path), "--nodes", str(args.nodes)],
                check=True, capture_output=True, text=True,
            )
            r = json.loads(out.stdout)
            rate = r["lines"] / r["seconds"]
            base_rate = base_rate or rate
            print(f"{phase:<10} {r['lines']:>12,} {r['seconds']:>8.1f} {r['cpu']:>7.1f} {rate:>12,.0f} {rate / base_rate:>10.3f} {r['rss_mib']:>13,.0f} {r['maxrss_mib']:>14,.0f}")
            if r.get("counts"):
                total = sum(r["counts"].values())
                shares = ", ".join(f"{k} {v / total:.2%}" for k, v in r["counts"].items())
                print(f"{'':<10} entries {r['entries']:,}, duplicates {r['duplicates']:,}; per node ({r['by']}): {shares}")
                line = f"{'':<10} busiest node / mean: {r['busiest']:.4f}"
                if "moved" in r:
                    line += (f"; adding a node moves {r['moved']:.2%} of the keys (1/(N+1) = {1 / (args.nodes + 1):.2%}), "
                             f"{r['moved_to_new']:.1%} of them to the new node")
                print(line)
            if r["rss_mib"] >= 1024 and phase != "baseline":
                print(f"{'':<10} WARNING: peak RSS above the 1 GiB goal")


if __name__ == "__main__":
    main()
