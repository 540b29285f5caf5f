"""Alluxio prewarm bench (run by hand): xdc's warm vs Alluxio's own distributed load, same list, same run.

    .venv/bin/python bench/prewarm_alluxio.py [--files 200] [--size-kib 1024] [--workers 1] [--reps 3]

Starts a JuiceFS S3 gateway and an Alluxio 2.9.6 cluster (devtools/alluxio.py), puts the files
through S3, then per rep, with every file freed from Alluxio before each run:
  baseline: Alluxio's own distributed load run directly on the same list:
            `alluxio fs distributedLoad --index LIST --replication W --direct-cache` (the job service's list load;
            2.9.6 ships DistributedLoadUtils but dropped the command class from its shell jar, so
            the class is taken from alluxio-shell 2.9.3 on Maven Central and put after the 2.9.6
            jars), and `alluxio fs load DIR --submit` (2.9.6's master-side load; the list is a
            whole directory here so both load the same files), finished when Alluxio holds every
            block of every file (polled through the proxy), JVM start included as a user sees it;
  ours:     run_prewarm end to end (list read, key mapping, ready gate, plan, warm, per-file check).
Prints each side's MiB/s (median over reps), the ratio (goal >= 0.9x) and the ETA error at 10 % and
50 % of progress with the bandwidth learnt in the earlier reps (goal within 10 %).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_client.alluxio import AlluxioCluster  # noqa: E402
from cache_client.base import CacheFile  # noqa: E402
from cache_client.prewarm.pipeline import Request, bandwidth, run_prewarm, to_cache_file  # noqa: E402
from cache_client.prewarm.progress import Progress  # noqa: E402
from xdc.topology import Topology  # noqa: E402
from devtools import alluxio as ax  # noqa: E402
from xdc import stack  # noqa: E402
from xdc.config import CacheConfig, XdcConfig, parse_config  # noqa: E402
from xdc.io.store import S3Store  # noqa: E402

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


def distload_classes(base: Path) -> Path:
    """A class dir holding alluxio-shell 2.9.3's DistributedLoadCommand (fetched into ~/.m2 by Maven)."""
    jar = Path.home() / ".m2/repository/org/alluxio/alluxio-shell" / DISTLOAD_VERSION / f"alluxio-shell-{DISTLOAD_VERSION}.jar"
    if not jar.exists():
        subprocess.run(["mvn", "-q", "-B", "dependency:get", f"-Dartifact=org.alluxio:alluxio-shell:{DISTLOAD_VERSION}",
                        "-Dtransitive=false"], check=True, capture_output=True, cwd=base)
    out = base / "distload-classes"
    with zipfile.ZipFile(jar) as z:
        z.extract(DISTLOAD_CLASS, out)
    return out


def wait_all_cached(cl: AlluxioCluster, files: list[CacheFile], replicas: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        views = cl.views(files, fresh=True)
        if all(v is not None and all(len(b.workers) >= replicas for b in v.blocks) for v in views.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("baseline load did not finish")
        time.sleep(0.05)


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
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="xdc-bench-alluxio-"))
    key, secret = f"bench{secrets.token_hex(4)}", secrets.token_urlsafe(24)
    started: list[stack.Proc] = []
    cluster: ax.LocalAlluxio | None = None
    ok = False
    try:
        meta = stack.format_volume(base / "A", "bench")
        gw = stack.start_gateway(base, "A", meta, key, secret)
        started.append(gw)
        url = f"http://127.0.0.1:{gw.port}"
        t = time.monotonic()
        quota = max(256, int(2 * a.files * a.size_kib / 1024) + 64)
        cluster = ax.start_cluster(base, "A", url, key, secret, root_bucket="bench-alluxio", workers=a.workers,
                                   quota_mib=quota)
        up = time.monotonic() - t
        rss = {p.name.split("-A-")[1]: round(ax.rss_mib(p)) for p in cluster.procs}
        print(f"alluxio {ax.ALLUXIO_VERSION}, {a.workers} worker(s): ready in {up:.1f}s; RSS MiB {rss} "
              f"(total {sum(rss.values())})")
        s3 = S3Store(url, key, secret, attempts=3)
        s3.ensure_bucket(BUCKET)
        ax.mount_bucket(cluster, BUCKET)
        keys = [f"ds/f{i:06d}" for i in range(a.files)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: s3.put(BUCKET, k, os.urandom(a.size_kib * 1024)), keys))
        lst = base / "list.txt"
        lst.write_text("".join(f"{BUCKET}/{k}\n" for k in keys))
        index = base / "index.txt"
        index.write_text("".join(f"/{BUCKET}/{k}\n" for k in keys))
        extra = distload_classes(base)

        cache = CacheConfig(**cluster.cache_config(placement="replicate"))
        cfg = config(cache, base)
        cl = AlluxioCluster(cache)
        files = [to_cache_file(f"{BUCKET}/{k}", "") for k in keys]
        site = Topology(cfg, "dca").here
        total_mib = a.workers * a.files * a.size_kib / 1024
        print(f"{a.files} files x {a.size_kib} KiB, replicate on {a.workers} worker(s): {total_mib:.0f} MiB loaded per run")

        def free() -> None:
            assert cl.free(files).complete

        def distload() -> float:
            free()
            t = time.monotonic()
            # --direct-cache, as ours: without it a second replica is only a read that may be served
            # by the worker already holding the block (2 workers: replicas never completed in 600 s)
            ax.shell(cluster, "distributedLoad", "--replication", str(a.workers), "--direct-cache",
                     "--index", str(index), timeout=1800, extra_cp=extra)
            wait_all_cached(cl, files, a.workers)
            return time.monotonic() - t

        def master_load() -> float:
            free()
            t = time.monotonic()
            ax.shell(cluster, "load", f"/{BUCKET}/ds", "--submit")
            wait_all_cached(cl, files, 1)  # the master's load job fills one replica
            return time.monotonic() - t

        # Untimed first round: the JVMs' first loads run interpreted (a first 256 KiB load took 7 s).
        (base / "warmup").mkdir(exist_ok=True)  # its own state: this round must not teach the ETA
        run_prewarm(Topology(config(cache, base / "warmup"), "dca").here, Request(str(lst)), progress=Progress(render="none"))
        distload()
        dl_t, ml_t, ours_t, warm_t, e10s, e50s, plan_err = [], [], [], [], [], [], []
        for rep in range(a.reps):
            if rep % 2 == 1:  # alternate the order: drift on a shared machine hits both sides
                dl_t.append(distload())
                if a.workers == 1:
                    ml_t.append(master_load())
            free()
            progress = Progress(bandwidth(site), render="none")
            t = time.monotonic()
            report = run_prewarm(site, Request(str(lst)), progress=progress)
            ours_t.append(time.monotonic() - t)
            assert report.complete, report.summary()
            if rep % 2 == 0:
                dl_t.append(distload())
                if a.workers == 1:
                    ml_t.append(master_load())
            finish = report.rounds[0]["seconds"]
            warm_t.append(finish)
            f10, e10 = eta_error(progress.history, finish, 0.10)
            f50, e50 = eta_error(progress.history, finish, 0.50)
            pe = (report.plan.eta_seconds - finish) / finish
            ml = f", fs load --submit {ml_t[-1]:.2f}s" if ml_t else ""
            print(f"rep {rep}: distributedLoad {dl_t[-1]:.2f}s{ml}, run_prewarm {ours_t[-1]:.2f}s (warm {finish:.2f}s); "
                  f"plan ETA {report.plan.eta_seconds:.2f}s ({pe:+.0%}, {report.plan.bandwidth.source}); "
                  f"ETA err at {f10:.0%}: {e10:+.1%}, at {f50:.0%}: {e50:+.1%}; phases "
                  + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
            if rep > 0:  # rep 0 has no learnt bandwidth yet
                e10s.append(e10)
                e50s.append(e50)
                plan_err.append(pe)
        d, o, w = statistics.median(dl_t), statistics.median(ours_t), statistics.median(warm_t)
        print(f"baseline distributedLoad --index: {total_mib / d:.1f} MiB/s ({d:.2f}s, JVM start included)")
        if ml_t:
            m = statistics.median(ml_t)
            print(f"baseline fs load --submit:        {total_mib / m:.1f} MiB/s ({m:.2f}s)")
        print(f"run_prewarm end to end:           {total_mib / o:.1f} MiB/s ({o:.2f}s) -> {d / o:.2f}x distributedLoad"
              + (f", {statistics.median(ml_t) / o:.2f}x fs load" if ml_t else "") + " (goal >= 0.9x)")
        print(f"run_prewarm warm phase:           {total_mib / w:.1f} MiB/s -> {d / w:.2f}x distributedLoad")
        if e10s:
            print(f"ETA error with learnt bandwidth (reps 1..): plan {statistics.median(plan_err):+.1%}, "
                  f"at 10 %: {statistics.median(e10s):+.1%}, at 50 %: {statistics.median(e50s):+.1%} (goal within 10 %)")
        ok = True
    finally:
        if cluster is not None:
            ax.stop_cluster(cluster)
        for p in reversed(started):
            stack.stop_proc(p)
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base} (logs in {base / 'logs'})", file=sys.stderr)


if __name__ == "__main__":
    main()
