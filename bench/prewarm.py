"""Prewarm bench (run by hand): run_prewarm vs bare `juicefs warmup` on the same real mounts, at a
realistic size and bandwidth, and how honest the ETA is.

    .venv/bin/python bench/prewarm.py --backend alluxio   # Alluxio: bench/prewarm_alluxio.py, same options there
    .venv/bin/python bench/prewarm.py            # 2,400 files, ~2.1 GiB, each node's mount at 400 Mbps
    .venv/bin/python bench/prewarm.py --files 200 --mean-kib 1024 --sigma 0 --download-limit-mbps 0 --reps 3
                                                 # the old small, unthrottled run

One volume (file storage, sqlite meta) mounted by two nodes, like the local stack's cache cluster.
A warm is bound by the object store's bandwidth, not by local disk: each mount is throttled with
JuiceFS's own `--download-limit` (what a node gets from a shared object store; 400 Mbps = 47.7
MiB/s), so a warm of 2 GiB per node lasts about 45 s. File sizes are log-normal around the mean
(720p frames to lidar sweeps; seeded), so per-file cost is part of the run.

Each rep, with every node's cache evicted (and flushed to disk) before each run:
  baseline: `juicefs warmup -f LIST -p T` on both mounts at once (what replicate placement does)
  ours:     run_prewarm end to end (list read, key mapping, ready gate, plan, warm, per-file check)
Then: end to end vs baseline (goal >= 0.9x); the ETA error at 10 % and 50 % of the progress,
(elapsed + ETA) vs the real end of the warm (goal within 10 %); the plan's ETA before the start vs
the real warm (goal within 15 %); the worst ETA error between 10 % and 90 %. Rep 0 starts from the
configured default bandwidth; later reps use what the earlier ones measured, as a datacenter does.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from cache_client.prewarm.progress import Progress, Snapshot  # noqa: E402
from xdc.config import CacheConfig, CacheNode, XdcConfig, parse_config  # noqa: E402
from xdc.topology import Site, Topology  # noqa: E402

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


# -- the dataset and the cluster ---------------------------------------------------------------------
def file_sizes(n: int, mean_kib: float, sigma: float, seed: int = 7) -> list[int]:
    """n sizes, log-normal with the given mean (sigma 0: all equal), between 16 KiB and 16 MiB."""
    rng = random.Random(seed)
    mu = math.log(mean_kib * 1024) - sigma * sigma / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    return [int(min(16 * MIB, max(16 * 1024, rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def write_dataset(root: Path, sizes: Sequence[int]) -> list[str]:
    """Write the files through a mount (distinct bytes: a random pool, a unique head per file)."""
    pool = os.urandom(max(sizes) + 4096)
    keys = []
    for i, size in enumerate(sizes):
        key = f"{BUCKET}/drive/{i // 200:03d}/{i:06d}.bin"
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        off = (i * 4099) % 4096
        p.write_bytes(i.to_bytes(8, "big") + pool[off:off + max(0, size - 8)])
        keys.append(key)
    return keys


def mount_cluster(base: Path, nodes: int, cache_mib: int, mbps: int, threads: int) -> CacheConfig:
    meta = f"sqlite3://{base}/meta.db"
    format_volume(meta, base / "data", "bench")
    cfg_nodes = [CacheNode(name=f"node{i}", mount=base / f"mnt{i}", cache_dir=base / f"cache{i}",
                           cache_size_mib=cache_mib) for i in range(1, nodes + 1)]
    return CacheConfig(meta_url=meta, nodes=cfg_nodes, threads_per_node=threads)


def throttle(mbps: int) -> list[str]:
    return ["--download-limit", str(mbps)] if mbps > 0 else []


def evict_all(cache: CacheConfig, keys: list[str], base: Path) -> None:
    for n in cache.nodes:
        lst = base / f"evict-{n.name}.txt"
        lst.write_text("".join(f"{n.mount}/{k}\n" for k in keys))
        run_juicefs(["warmup", "--evict", "-f", str(lst)])
    # The previous run wrote its cache blocks: flush them now, not during the next timed run.
    os.sync()
    time.sleep(1.0)


def baseline(cache: CacheConfig, keys: list[str], base: Path) -> float:
    """Bare `juicefs warmup` of the list on every node's mount at once."""
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


# -- ETA honesty -------------------------------------------------------------------------------------
def eta_error(history: list[Snapshot], finish: float, at: float) -> tuple[float, float]:
    """(fraction actually used, relative error of elapsed+ETA vs real finish) at the first snapshot >= at."""
    for s in history:
        if s.fraction >= at and s.elapsed > 0:
            return s.fraction, (s.elapsed + s.eta_seconds - finish) / finish
    return float("nan"), float("nan")


def worst_eta_error(history: list[Snapshot], finish: float, lo: float = 0.1, hi: float = 0.9) -> float:
    errs = [(s.elapsed + s.eta_seconds - finish) / finish for s in history if lo <= s.fraction <= hi and s.elapsed > 0]
    return max(errs, key=abs) if errs else float("nan")


@dataclass
class Figures:
    base_s: list[float] = field(default_factory=list)
    ours_s: list[float] = field(default_factory=list)
    warm_s: list[float] = field(default_factory=list)
    e10: list[float] = field(default_factory=list)  # reps with learnt bandwidth only
    e50: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    plan: list[float] = field(default_factory=list)


def one_rep(rep: int, site: Site, cache: CacheConfig, keys: list[str], lst: Path, base: Path, figs: Figures) -> None:
    if rep % 2 == 1:  # alternate the order: drift on a shared machine hits both sides
        evict_all(cache, keys, base)
        figs.base_s.append(baseline(cache, keys, base))
    evict_all(cache, keys, base)
    progress = Progress(bandwidth(site), render="none")
    t = time.monotonic()
    report = run_prewarm(site, Request(str(lst)), progress=progress)
    figs.ours_s.append(time.monotonic() - t)
    if rep % 2 == 0:
        evict_all(cache, keys, base)
        figs.base_s.append(baseline(cache, keys, base))
    assert report.complete, report.summary()
    finish = report.rounds[0]["seconds"]
    figs.warm_s.append(finish)
    f10, e10 = eta_error(progress.history, finish, 0.10)
    f50, e50 = eta_error(progress.history, finish, 0.50)
    worst = worst_eta_error(progress.history, finish)
    pe = (report.plan.eta_seconds - finish) / finish
    print(f"rep {rep}: baseline {figs.base_s[-1]:.1f}s, run_prewarm {figs.ours_s[-1]:.1f}s (warm {finish:.1f}s); "
          f"plan ETA {report.plan.eta_seconds:.1f}s ({pe:+.1%}, {report.plan.bandwidth.source}: "
          f"{report.plan.bandwidth.bytes_per_s / MIB:.1f} MiB/s + {report.plan.bandwidth.per_file_s * 1000:.2f} ms/file); "
          f"ETA err at {f10:.0%}: {e10:+.1%}, at {f50:.0%}: {e50:+.1%}, worst 10-90 %: {worst:+.1%}; phases "
          + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()), flush=True)
    if rep > 0:  # rep 0 has no learnt bandwidth yet: the default says nothing about this machine
        figs.e10.append(e10)
        figs.e50.append(e50)
        figs.worst.append(worst)
        figs.plan.append(pe)


def summary(figs: Figures, files: int, nodes: int, total_mib: float) -> None:
    b, o, w = statistics.median(figs.base_s), statistics.median(figs.ours_s), statistics.median(figs.warm_s)
    loads = files * nodes
    print(f"baseline juicefs warmup: {loads / b:.0f} file loads/s, {total_mib / b:.1f} MiB/s ({b:.1f}s)")
    print(f"run_prewarm end to end:  {loads / o:.0f} file loads/s, {total_mib / o:.1f} MiB/s ({o:.1f}s) "
          f"-> {b / o:.2f}x baseline (goal >= 0.9x)")
    print(f"run_prewarm warm phase:  {total_mib / w:.1f} MiB/s -> {b / w:.2f}x baseline")
    if figs.e10:
        print(f"ETA with learnt bandwidth (reps 1..): plan before start {statistics.median(figs.plan):+.1%} "
              f"(goal within 15 %); at 10 %: {statistics.median(figs.e10):+.1%}, at 50 %: {statistics.median(figs.e50):+.1%} "
              f"(goal within 10 %); worst between 10 and 90 %: {max(figs.worst, key=abs):+.1%}")


def juicefs_bench(a: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="xdc-bench-prewarm-"))
    sizes = file_sizes(a.files, a.mean_kib, a.sigma)
    per_node_mib = sum(sizes) / MIB
    cache = mount_cluster(base, a.nodes, max(1024, int(per_node_mib * 1.5)), a.download_limit_mbps, a.threads)
    mounted: list[CacheNode] = []
    try:
        for n in cache.nodes:
            mount_node(cache.meta_url or "", n, extra_args=throttle(a.download_limit_mbps))
            mounted.append(n)
        t = time.monotonic()
        keys = write_dataset(Path(cache.nodes[0].mount or ""), sizes)
        lst = base / "list.txt"
        lst.write_text("\n".join(keys) + "\n")
        site = Topology(config(cache, base), "dca").here
        limit = f"{a.download_limit_mbps} Mbps ({a.download_limit_mbps / 8 * 1e6 / MIB:.1f} MiB/s)" \
            if a.download_limit_mbps else "unthrottled"
        print(f"{a.files} files, {per_node_mib / 1024:.2f} GiB (sizes log-normal, mean {a.mean_kib:.0f} KiB, "
              f"sigma {a.sigma}), written in {time.monotonic() - t:.0f}s; {a.nodes} nodes (replicate), "
              f"-p {a.threads}, each mount's download limit {limit}; {per_node_mib * a.nodes / 1024:.2f} GiB loaded per run",
              flush=True)
        figs = Figures()
        for rep in range(a.reps):
            one_rep(rep, site, cache, keys, lst, base, figs)
        summary(figs, a.files, a.nodes, per_node_mib * a.nodes)
    finally:
        for n in mounted:
            umount_node(n)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def main() -> None:
    if "--backend" in sys.argv and sys.argv[sys.argv.index("--backend") + 1:][:1] == ["alluxio"]:
        # Alluxio (and its own distributed load as the baseline): bench/prewarm_alluxio.py
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("prewarm_alluxio.py")), *sys.argv[1:]])
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["juicefs", "alluxio"], default="juicefs")
    ap.add_argument("--files", type=int, default=2400)
    ap.add_argument("--mean-kib", type=float, default=900.0)
    ap.add_argument("--sigma", type=float, default=0.6, help="log-normal spread of the sizes (0: all equal)")
    ap.add_argument("--download-limit-mbps", type=int, default=400, help="per mount; 0: unthrottled")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8)
    juicefs_bench(ap.parse_args())


if __name__ == "__main__":
    main()
