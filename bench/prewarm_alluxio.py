"""Prewarm bench on Alluxio (run by hand; `bench/prewarm.py --backend alluxio` runs this): run_prewarm vs
the cache's own loader on the same list, and ETA error.

    .venv/bin/python bench/prewarm.py [--backend juicefs|alluxio] [--files 200] [--size-kib 1024] [--reps 3]
                                      [--threads 8] [--workers 1]

Each rep, with the list's files dropped from every node's cache before each run:
  juicefs  one volume (file storage, sqlite meta) mounted by two nodes, like the local stack's.
           baseline: `juicefs warmup -f LIST -p T` on both mounts at once (what replicate does).
  alluxio  a JuiceFS S3 gateway and an Alluxio 2.9.6 cluster of `--workers` workers
           (devtools/alluxio.py), the files put through S3. Baselines: Alluxio's own distributed
           load run directly on the same list, `alluxio fs distributedLoad --index LIST
           --replication W --direct-cache` (the job service's list load; 2.9.6 ships
           DistributedLoadUtils but dropped the command class from its shell jar, so the class is
           taken from alluxio-shell 2.9.3 on Maven Central and put after the 2.9.6 jars), and with
           one worker `alluxio fs load DIR --submit` (2.9.6's master-side load; the list is a whole
           directory here so both load the same files); finished when Alluxio holds every block of
           every file (polled through the proxy), JVM start included as a user sees it. An
           untimed first round warms the JVMs (their first loads run interpreted).
  ours:    run_prewarm end to end (list read, key mapping, ready gate, plan, warm, per-file check).
Prints each side's MiB/s (median over reps) and the ratio (goal >= 0.9x), then the ETA error: at
10 % and 50 % of progress, (elapsed + ETA) vs the real finish of the warm (goal within 10 %). The
bandwidth model is learnt from the earlier reps of the same run, as it would be per datacenter.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_client.alluxio import AlluxioCluster  # noqa: E402
from cache_client.base import CacheFile  # noqa: E402
from cache_client.juicefs import (  # noqa: E402
    format_volume,
    juicefs_bin,
    mount_node,
    run_juicefs,
    umount_node,
)
from cache_client.prewarm.pipeline import Request, bandwidth, run_prewarm, to_cache_file  # noqa: E402
from cache_client.prewarm.progress import Progress  # noqa: E402
from devtools import alluxio as ax  # noqa: E402
from devtools import stack  # noqa: E402
from devtools.procs import Proc, stop_proc  # noqa: E402
from xdc.config import CacheConfig, CacheNode, XdcConfig, parse_config  # noqa: E402
from xdc.io.store import S3Store  # noqa: E402
from xdc.retry import RetryPolicy  # noqa: E402
from xdc.topology import Topology  # noqa: E402

MIB = 1 << 20
BUCKET = "bench"
DISTLOAD_VERSION = "2.9.3"  # the last alluxio-shell with DistributedLoadCommand
DISTLOAD_CLASS = "alluxio/cli/fs/command/DistributedLoadCommand.class"


def config(cache: CacheConfig, base: Path) -> XdcConfig:
    return parse_config({
        "local_dc": "dca",
        "datacenters": {"dca": {
            "s3": {"internal_url": "http://127.0.0.1:1", "external_url": "http://127.0.0.1:1",
                   "credentials": {"access_key_env": "X", "secret_key_env": "Y"}},
            "kafka": {"bootstrap_servers": ["127.0.0.1:1"]},
            "state_url": f"sqlite:///{base / 'state.db'}",
            "cache": cache.model_dump(mode="json", exclude_none=True),
            "buckets": [BUCKET],
        }},
        "prewarm": {"ready_timeout_seconds": 10},
    })


def eta_error(history: list[Any], finish: float, at: float) -> tuple[float, float]:
    """(fraction actually used, relative error of elapsed+ETA vs real finish) at the first snapshot >= at."""
    for s in history:
        if s.fraction >= at and s.elapsed > 0:
            return s.fraction, (s.elapsed + s.eta_seconds - finish) / finish
    return float("nan"), float("nan")


# -- the two caches ----------------------------------------------------------------------------------
class JuiceFSBench:
    """Two mounts of one volume; baseline `juicefs warmup` on both at once."""

    name = "juicefs"
    baselines = ("juicefs warmup",)

    def __init__(self, a: argparse.Namespace, base: Path) -> None:
        self.a, self.base = a, base
        meta = f"sqlite3://{base}/meta.db"
        format_volume(meta, base / "data", "bench")
        self.nodes = [CacheNode(name=f"node{i}", mount=base / f"mnt{i}", cache_dir=base / f"cache{i}",
                                cache_size_mib=4096) for i in (1, 2)]
        self.cache = CacheConfig(meta_url=meta, nodes=self.nodes, threads_per_node=a.threads)
        self.mounted: list[CacheNode] = []
        for n in self.nodes:
            mount_node(meta, n)
            self.mounted.append(n)
        self.replicas = len(self.nodes)

    def put(self, keys: list[str]) -> None:
        root = Path(self.nodes[0].mount or "")
        for k in keys:
            p = root / BUCKET / k
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(self.a.size_kib * 1024))
        self.keys = [f"{BUCKET}/{k}" for k in keys]

    def drop(self) -> None:
        for n in self.nodes:
            lst = self.base / f"evict-{n.name}.txt"
            lst.write_text("".join(f"{n.mount}/{k}\n" for k in self.keys))
            run_juicefs(["warmup", "--evict", "-f", str(lst)])
        # The previous run wrote 2 x N MiB of cache blocks: flush them now, not during the next timed run.
        os.sync()
        time.sleep(0.5)

    def baseline(self, which: str) -> float:
        self.drop()
        lists = []
        for n in self.nodes:
            lst = self.base / f"warm-{n.name}.txt"
            lst.write_text("".join(f"{n.mount}/{k}\n" for k in self.keys))
            lists.append(lst)
        t = time.monotonic()
        with ThreadPoolExecutor(len(lists)) as pool:
            for cp in pool.map(lambda lst: subprocess.run(
                    [juicefs_bin(), "warmup", "-f", str(lst), "-p", str(self.a.threads)],
                    capture_output=True, text=True, check=False), lists):
                assert cp.returncode == 0, cp.stderr
        return time.monotonic() - t

    def close(self) -> None:
        for n in self.mounted:
            umount_node(n)


class AlluxioBench:
    """An Alluxio cluster over a JuiceFS S3 gateway; baselines distributedLoad and fs load --submit."""

    name = "alluxio"

    def __init__(self, a: argparse.Namespace, base: Path) -> None:
        self.a, self.base = a, base
        self.started: list[Proc] = []
        self.local: ax.LocalAlluxio | None = None
        key, secret = f"bench{secrets.token_hex(4)}", secrets.token_urlsafe(24)
        meta = stack.format_volume(base / "A", "bench")
        gw = stack.start_gateway(base, "A", meta, key, secret)
        self.started.append(gw)
        url = f"http://127.0.0.1:{gw.port}"
        t = time.monotonic()
        quota = max(256, int(2 * a.files * a.size_kib / 1024) + 64)
        self.local = ax.start_cluster(base, "A", url, key, secret, root_bucket="bench-alluxio", workers=a.workers,
                                      quota_mib=quota)
        up = time.monotonic() - t
        rss = {p.name.split("-A-")[1]: round(ax.rss_mib(p)) for p in self.local.procs}
        print(f"alluxio {ax.ALLUXIO_VERSION}, {a.workers} worker(s): ready in {up:.1f}s; RSS MiB {rss} "
              f"(total {sum(rss.values())})")
        self.s3 = S3Store(url, key, secret, retry=RetryPolicy(max_attempts=3))
        self.s3.ensure_bucket(BUCKET)
        ax.mount_bucket(self.local, BUCKET)
        self.cache = CacheConfig(**self.local.cache_config(placement="replicate", threads_per_node=a.threads))
        self.cluster = AlluxioCluster(self.cache)
        self.replicas = a.workers
        self.baselines = ("distributedLoad --index",) + (("fs load --submit",) if a.workers == 1 else ())

    def put(self, keys: list[str]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: self.s3.put(BUCKET, k, os.urandom(self.a.size_kib * 1024)), keys))
        self.keys = [f"{BUCKET}/{k}" for k in keys]
        self.files: list[CacheFile] = [to_cache_file(k, "") for k in self.keys]
        self.index = self.base / "index.txt"
        self.index.write_text("".join(f"/{k}\n" for k in self.keys))
        self.extra = self._distload_classes()

    def _distload_classes(self) -> Path:
        """A class dir holding alluxio-shell 2.9.3's DistributedLoadCommand (fetched into ~/.m2 by Maven)."""
        jar = (Path.home() / ".m2/repository/org/alluxio/alluxio-shell" / DISTLOAD_VERSION
               / f"alluxio-shell-{DISTLOAD_VERSION}.jar")
        if not jar.exists():
            subprocess.run(["mvn", "-q", "-B", "dependency:get", f"-Dartifact=org.alluxio:alluxio-shell:{DISTLOAD_VERSION}",
                            "-Dtransitive=false"], check=True, capture_output=True, cwd=self.base)
        out = self.base / "distload-classes"
        with zipfile.ZipFile(jar) as z:
            z.extract(DISTLOAD_CLASS, out)
        return out

    def drop(self) -> None:
        assert self.cluster.free(self.files).complete

    def _wait_all_cached(self, replicas: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            views = self.cluster.views(self.files, fresh=True)
            if all(v is not None and all(len(b.workers) >= replicas for b in v.blocks) for v in views.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("baseline load did not finish")
            time.sleep(0.05)

    def baseline(self, which: str) -> float:
        assert self.local is not None
        self.drop()
        t = time.monotonic()
        if which.startswith("distributedLoad"):
            # --direct-cache, as ours: without it a second replica is only a read that may be served
            # by the worker already holding the block (2 workers: replicas never completed in 600 s)
            ax.shell(self.local, "distributedLoad", "--replication", str(self.a.workers), "--direct-cache",
                     "--index", str(self.index), timeout=1800, extra_cp=self.extra)
            self._wait_all_cached(self.a.workers)
        else:
            ax.shell(self.local, "load", f"/{BUCKET}/ds", "--submit")
            self._wait_all_cached(1)  # the master's load job fills one replica
        return time.monotonic() - t

    def warm_up(self, lst: Path) -> None:
        """Untimed: the JVMs' first loads run interpreted (a first 256 KiB load took 7 s)."""
        (self.base / "warmup").mkdir(exist_ok=True)  # its own state: this round must not teach the ETA
        run_prewarm(Topology(config(self.cache, self.base / "warmup"), "dca").here, Request(str(lst)),
                    progress=Progress(render="none"))
        self.baseline(self.baselines[0])

    def close(self) -> None:
        if self.local is not None:
            ax.stop_cluster(self.local)
        for p in reversed(self.started):
            stop_proc(p)


# -- the bench ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["juicefs", "alluxio"], default="juicefs")
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--size-kib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="alluxio: workers (replicate placement on all)")
    a = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix=f"xdc-bench-prewarm-{a.backend}-"))
    bench: JuiceFSBench | AlluxioBench | None = None
    ok = False
    try:
        bench = JuiceFSBench(a, base) if a.backend == "juicefs" else AlluxioBench(a, base)
        keys = [f"ds/f{i:06d}" for i in range(a.files)]
        bench.put(keys)
        lst = base / "list.txt"
        lst.write_text("\n".join(bench.keys) + "\n")
        site = Topology(config(bench.cache, base), "dca").here
        total_mib = bench.replicas * a.files * a.size_kib / 1024
        print(f"{a.backend}: {a.files} files x {a.size_kib} KiB, replicate on {bench.replicas} node(s), "
              f"{a.threads} threads per node; {total_mib:.0f} MiB loaded per run")
        if isinstance(bench, AlluxioBench):
            bench.warm_up(lst)

        base_t: dict[str, list[float]] = {b: [] for b in bench.baselines}
        ours_t, warm_t, errors10, errors50, plan_err = [], [], [], [], []

        def baselines() -> None:
            for b in bench.baselines:  # type: ignore[union-attr]
                base_t[b].append(bench.baseline(b))  # type: ignore[union-attr]

        for rep in range(a.reps):
            if rep % 2 == 1:  # alternate the order: drift on a shared machine hits both sides
                baselines()
            bench.drop()
            progress = Progress(bandwidth(site), render="none")
            t = time.monotonic()
            report = run_prewarm(site, Request(str(lst)), progress=progress)
            ours_t.append(time.monotonic() - t)
            assert report.complete, report.summary()
            if rep % 2 == 0:
                baselines()
            finish = report.rounds[0]["seconds"]
            warm_t.append(finish)
            f10, e10 = eta_error(progress.history, finish, 0.10)
            f50, e50 = eta_error(progress.history, finish, 0.50)
            pe = (report.plan.eta_seconds - finish) / finish
            print(f"rep {rep}: " + ", ".join(f"{b} {v[-1]:.2f}s" for b, v in base_t.items())
                  + f", run_prewarm {ours_t[-1]:.2f}s (warm {finish:.2f}s); "
                  f"plan ETA {report.plan.eta_seconds:.2f}s ({pe:+.0%}, {report.plan.bandwidth.source}); "
                  f"ETA err at {f10:.0%}: {e10:+.1%}, at {f50:.0%}: {e50:+.1%}; phases "
                  + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
            if rep > 0:  # rep 0 has no learnt bandwidth yet: the default says nothing about this machine
                errors10.append(e10)
                errors50.append(e50)
                plan_err.append(pe)
        o, w = statistics.median(ours_t), statistics.median(warm_t)
        for b, v in base_t.items():
            m = statistics.median(v)
            print(f"baseline {b:<24} {total_mib / m:7.1f} MiB/s ({m:.2f}s)")
        print(f"run_prewarm end to end:           {total_mib / o:7.1f} MiB/s ({o:.2f}s) -> "
              + ", ".join(f"{statistics.median(v) / o:.2f}x {b}" for b, v in base_t.items()) + " (goal >= 0.9x)")
        print(f"run_prewarm warm phase:           {total_mib / w:7.1f} MiB/s ({w:.2f}s) -> "
              + ", ".join(f"{statistics.median(v) / w:.2f}x {b}" for b, v in base_t.items()))
        if errors10:
            print(f"ETA error with learnt bandwidth (reps 1..): plan {statistics.median(plan_err):+.1%}, "
                  f"at 10 %: {statistics.median(errors10):+.1%}, at 50 %: {statistics.median(errors50):+.1%} "
                  "(goal within 10 %)")
        ok = True
    finally:
        if bench is not None:
            bench.close()
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base} (logs in {base / 'logs'})", file=sys.stderr)


if __name__ == "__main__":
    main()
