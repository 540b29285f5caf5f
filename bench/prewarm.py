"""Prewarm bench (run by hand): run_prewarm vs `juicefs warmup` on the same real mounts, and ETA error.

    .venv/bin/python bench/prewarm.py [--files 200] [--size-kib 1024] [--reps 3]

One volume (file storage, sqlite meta) mounted by two nodes, like the local stack's cache cluster.
Each rep, with every node's cache evicted before each run:
  baseline: `juicefs warmup -f LIST -p T` on both mounts at once (what replicate placement does)
  ours:     run_prewarm end to end (list read, key mapping, ready gate, plan, warm, per-file check)
Prints files/s and MiB/s of each (median over reps) and the ratio (goal >= 0.9x), then the ETA
error: at 10 % and 50 % of progress, (elapsed + ETA) vs the real finish (goal within 10 %). The
bandwidth model is learnt from the earlier reps of the same run, as it would be per datacenter.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from cache_client.juicefs import (  # noqa: E402
    format_volume,
    juicefs_bin,
    mount_node,
    run_juicefs,
    umount_node,
)
from cache_client.prewarm.pipeline import Request, bandwidth, run_prewarm  # noqa: E402
from cache_client.prewarm.progress import Progress  # noqa: E402
from xdc.config import CacheConfig, CacheNode, XdcConfig, parse_config  # noqa: E402
from xdc.topology import Topology  # noqa: E402

MIB = 1 << 20
BUCKET = "bench"


def config(cache: CacheConfig, base: Path) -> XdcConfig:
    return parse_config({
        "local_dc": "dca",
        "datacenters": {"dca": {
            "s3": {"internal_url": "http://127.0.0.1:1", "external_url": "http://127.0.0.1:1",
                   "credentials": {"access_key_env": "X", "secret_key_env": "Y"}},
            "kafka": {"bootstrap_servers": ["127.0.0.1:1"]},
            "state_url": f"sqlite:///{base / 'state.db'}",
            "cache": cache.model_dump(mode="json"),
            "buckets": [BUCKET],
        }},
        "prewarm": {"ready_timeout_seconds": 10},
    })


def evict_all(cache: CacheConfig, keys: list[str], base: Path) -> None:
    for n in cache.nodes:
        lst = base / f"evict-{n.name}.txt"
        lst.write_text("".join(f"{n.mount}/{k}\n" for k in keys))
        run_juicefs(["warmup", "--evict", "-f", str(lst)])
    # The previous run wrote 2 x N MiB of cache blocks: flush them now, not during the next timed run.
    os.sync()
    time.sleep(0.5)


def baseline(cache: CacheConfig, keys: list[str], base: Path) -> float:
    lists = []
    for n in cache.nodes:
        lst = base / f"warm-{n.name}.txt"
        lst.write_text("".join(f"{n.mount}/{k}\n" for k in keys))
        lists.append(lst)
    t = time.monotonic()
    with ThreadPoolExecutor(len(lists)) as pool:
        for cp in pool.map(lambda lst: subprocess.run([juicefs_bin(), "warmup", "-f", str(lst), "-p", str(cache.threads_per_node)],
                                                      capture_output=True, text=True), lists):
            assert cp.returncode == 0, cp.stderr
    return time.monotonic() - t


def eta_error(history: list, finish: float, at: float) -> tuple[float, float]:
    """(fraction actually used, relative error of elapsed+ETA vs real finish) at the first snapshot >= at."""
    for s in history:
        if s.fraction >= at and s.elapsed > 0:
            return s.fraction, (s.elapsed + s.eta_seconds - finish) / finish
    return float("nan"), float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--size-kib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8)
    a = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="xdc-bench-prewarm-"))
    meta = f"sqlite3://{base}/meta.db"
    format_volume(meta, base / "data", "bench")
    nodes = [CacheNode(name=f"node{i}", mount=base / f"mnt{i}", cache_dir=base / f"cache{i}", cache_size_mib=4096) for i in (1, 2)]
    cache = CacheConfig(meta_url=meta, nodes=nodes, threads_per_node=a.threads)
    mounted: list[CacheNode] = []
    try:
        for n in nodes:
            mount_node(meta, n)
            mounted.append(n)
        keys = [f"{BUCKET}/f/{i:06d}" for i in range(a.files)]
        root = Path(nodes[0].mount)
        for k in keys:
            p = root / k
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(a.size_kib * 1024))
        lst = base / "list.txt"
        lst.write_text("\n".join(keys) + "\n")
        cfg = config(cache, base)
        site = Topology(cfg, "dca").here
        total_mib = 2 * a.files * a.size_kib / 1024  # two nodes, replicate
        print(f"{a.files} files x {a.size_kib} KiB, 2 nodes (replicate), -p {a.threads}; {total_mib:.0f} MiB loaded per run")

        base_t, ours_t, warm_t, errors10, errors50, plan_err = [], [], [], [], [], []
        for rep in range(a.reps):
            if rep % 2 == 1:  # alternate the order: drift on a shared machine hits both sides
                evict_all(cache, keys, base)
                base_t.append(baseline(cache, keys, base))
            evict_all(cache, keys, base)
            progress = Progress(bandwidth(site), render="none")
            t = time.monotonic()
            report = run_prewarm(site, Request(str(lst)), progress=progress)
            ours_t.append(time.monotonic() - t)
            if rep % 2 == 0:
                evict_all(cache, keys, base)
                base_t.append(baseline(cache, keys, base))
            assert report.complete, report.summary()
            finish = report.rounds[0]["seconds"]
            warm_t.append(finish)
            f10, e10 = eta_error(progress.history, finish, 0.10)
            f50, e50 = eta_error(progress.history, finish, 0.50)
            pe = (report.plan.eta_seconds - finish) / finish
            print(f"rep {rep}: baseline {base_t[-1]:.2f}s, run_prewarm {ours_t[-1]:.2f}s (warm {finish:.2f}s); "
                  f"plan ETA {report.plan.eta_seconds:.2f}s ({pe:+.0%}, {report.plan.bandwidth.source}); "
                  f"ETA err at {f10:.0%}: {e10:+.1%}, at {f50:.0%}: {e50:+.1%}; phases "
                  + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
            if rep > 0:  # rep 0 has no learnt bandwidth yet: the default says nothing about this machine
                errors10.append(e10)
                errors50.append(e50)
                plan_err.append(pe)
        b, o, w = statistics.median(base_t), statistics.median(ours_t), statistics.median(warm_t)
        print(f"baseline juicefs warmup: {a.files * 2 / b:.0f} file loads/s, {total_mib / b:.0f} MiB/s ({b:.2f}s)")
        print(f"run_prewarm end to end:  {a.files * 2 / o:.0f} file loads/s, {total_mib / o:.0f} MiB/s ({o:.2f}s) "
              f"-> {b / o:.2f}x baseline (goal >= 0.9x)")
        print(f"run_prewarm warm phase:  {total_mib / w:.0f} MiB/s -> {b / w:.2f}x baseline")
        if errors10:
            print(f"ETA error with learnt bandwidth (reps 1..): plan {statistics.median(plan_err):+.1%}, "
                  f"at 10 %: {statistics.median(errors10):+.1%}, at 50 %: {statistics.median(errors50):+.1%} (goal within 10 %)")
    finally:
        for n in mounted:
            umount_node(n)
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
