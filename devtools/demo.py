"""`xdc demo`: the whole flow on the embedded default, then a report.

Two local datacenters -> synthetic 4K camera frames and lidar ingested into IDC-A -> 720p
derivatives -> mirrored into IDC-B -> a sample verified byte for byte -> the release prewarmed into
both caches -> lag snapshot, dashboard snapshot, report. Everything it started is stopped.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from cache_client.prewarm.pipeline import Request, run_prewarm
from devtools import stack
from devtools.samples import write_samples
from mirror.ingest import ingest
from mirror.runner import Mirror
from resize.worker import ResizeWorker
from xdc.config import XdcConfig
from xdc.observe.dashboard import serve_dashboard, snapshot_html
from xdc.observe.lag import record_lag_snapshot
from xdc.topology import Topology

log = logging.getLogger(__name__)
MIB = 2**20


def _step(name: str) -> float:
    print(f"==> {name}", flush=True)
    return time.monotonic()


def run_demo(run_dir: Path, *, frames: int = 200, lidar: int = 5, keep: bool = False, state: str = "sqlite") -> int:
    run_dir = run_dir.resolve()
    report: dict[str, Any] = {"run_dir": str(run_dir)}
    t_all = time.monotonic()
    samples = run_dir / "samples"
    t = _step("generate sample frames")
    if not (samples / "frames").exists() or len(list((samples / "frames").iterdir())) < frames:
        write_samples(samples, frames=frames, lidar=lidar)
    report["generate_s"] = round(time.monotonic() - t, 1)

    t = _step("start the local stack (2 datacenters: broker, S3, state, 2 cache nodes each)")
    stack.down(run_dir / "stack")  # a demo starts from empty datacenters
    shutil.rmtree(run_dir / "stack", ignore_errors=True)
    cfg = stack.up(run_dir / "stack", nodes=2, cache_size_mib=1024, state=state)
    report["stack_up_s"] = round(time.monotonic() - t, 1)
    report["state"] = state
    flow_t0 = time.monotonic()
    viewer = Topology(cfg, "B")
    board = serve_dashboard(viewer, "127.0.0.1", 0)
    print(f"    dashboard (live while the demo runs): {board.url}", flush=True)
    try:
        _flow(cfg, samples, run_dir, report)
    finally:
        board.stop()
        viewer.close()
        report["flow_s"] = round(time.monotonic() - flow_t0, 1)
        if keep:
            print(f"stack left running: xdc --run-dir {run_dir / 'stack'} stack down")
        else:
            stack.down(run_dir / "stack")
    report["total_s"] = round(time.monotonic() - t_all, 1)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _print_report(report)
    return 0 if report.get("verified_ok") and report.get("prewarm_ok", True) else 1


def _flow(cfg: XdcConfig, samples: Path, run_dir: Path, report: dict[str, Any]) -> None:
    src_bucket = cfg.routes[0].source.bucket
    dst_bucket = cfg.routes[0].target.bucket
    in_a, in_b = Topology(cfg, "A"), Topology(cfg, "B")
    try:
        # The mirror follows from the start, as in production, so the lag it reports is real.
        mirror = Mirror(in_b)
        stop = threading.Event()
        mirrored: dict[str, Any] = {}
        follower = threading.Thread(target=lambda: mirrored.update(stats=mirror.run(stop=stop)), daemon=True)
        follower.start()
        try:
            t = _step("ingest into IDC-A (upload + S3 event notifications on Kafka); the mirror follows")
            cam = ingest(in_a.here, samples / "frames", src_bucket, "camera/raw/")
            lid = ingest(in_a.here, samples / "lidar", src_bucket, "lidar/")
            report["ingest"] = {"objects": cam.files + lid.files, "bytes": cam.bytes + lid.bytes,
                                "seconds": round(time.monotonic() - t, 2)}

            _step("resize 4K -> 720p in IDC-A")
            with ResizeWorker(in_a) as w:
                rs = w.run(once=True)
            report["resize"] = rs.to_dict()

            _step("wait until IDC-B has caught up")
            _wait_mirrored(in_b, timeout_s=180)
        finally:
            stop.set()
            follower.join(timeout=60)
            mirror.close()
        ms = mirrored["stats"]
        report["mirror"] = ms.to_dict()
        report["mirror"]["mib_per_s"] = round(ms.bytes_copied / MIB / ms.busy_seconds, 1) if ms.busy_seconds else None

        _step("verify a sample byte for byte")
        report.update(_verify(in_b, src_bucket, dst_bucket))

        _step("prewarm the released dataset into both caches")
        report["prewarm"] = _prewarm(in_a, run_dir)
        report["prewarm_ok"] = all(p["complete"] for p in report["prewarm"].values())

        _step("lag snapshot and dashboard snapshot")
        record_lag_snapshot(in_b.here)
        (run_dir / "dashboard.html").write_text(snapshot_html(in_b))
        report["dashboard_snapshot"] = str(run_dir / "dashboard.html")
        lags = ms.lags
        report["lag"] = {"p50_s": lags.percentile(50), "p99_s": lags.percentile(99)}
    finally:
        in_a.close()
        in_b.close()


def _wait_mirrored(in_b: Topology, timeout_s: float) -> None:
    """Until every object under a route's source prefix in A is live in B's state."""
    a = in_b.site("A").store
    want = {(r.target.bucket, r.target_key(o.key)) for r in in_b.routes_from("A")
            for o in a.list(r.source.bucket, r.source.prefix)}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        have = {(e.bucket, e.key) for e in in_b.here.state.catalog.live_objects()}
        if want <= have:
            return
        time.sleep(0.5)
    raise TimeoutError(f"mirror did not catch up in {timeout_s:.0f}s")


def _verify(in_b: Topology, src_bucket: str, dst_bucket: str, sample: int = 20) -> dict[str, Any]:
    a, b = in_b.site("A").store, in_b.here.store
    keys = [o.key for o in a.list(src_bucket, "camera/")]
    rng = random.Random(0)
    picked = rng.sample(keys, min(sample, len(keys)))
    bad = [k for k in picked if a.get(src_bucket, k) != b.get(dst_bucket, k)]
    return {"verified": len(picked), "verified_ok": not bad and bool(picked), "verify_mismatch": bad}


def _prewarm(in_a: Topology, run_dir: Path) -> dict[str, Any]:
    """Release the 720p frames as a dataset (a file list in IDC-A's keys) and warm both DCs."""
    src_bucket = in_a.config.routes[0].source.bucket
    keys = [o.key for o in in_a.here.store.list(src_bucket, "camera/720p/")]
    lst = run_dir / "release-720p.txt"
    lst.write_text("".join(f"{src_bucket}/{k}\n" for k in keys))
    out = {}
    for site in in_a.prewarm_sites():
        with in_a.seen_from(site.name) as there:
            rep = run_prewarm(there.here, Request(str(lst), "demo-720p", "v1"), ready_timeout=60)
        out[site.name] = {"complete": rep.complete, "files": rep.check.to_dict(0).get("files"),
                          "summary": rep.summary(), "eta_planned_s": rep.plan.eta_seconds,
                          "seconds": round(rep.seconds, 2)}
    return out


def _print_report(r: dict[str, Any]) -> None:
    print("\n========== xdc-mirror demo report ==========")
    ing = r.get("ingest", {})
    print(f"ingested into IDC-A : {ing.get('objects')} objects, {ing.get('bytes', 0) / MIB:.1f} MiB "
          f"in {ing.get('seconds')} s")
    rs = r.get("resize", {})
    if rs:
        print(f"resize 4K -> 720p  : {rs.get('results')}, {rs.get('bytes_in', 0) / MIB:.1f} MiB -> "
              f"{rs.get('bytes_out', 0) / MIB:.1f} MiB ({rs.get('ratio')}x smaller), {rs.get('frames_per_s')} frames/s")
    m = r.get("mirror", {})
    if m:
        print(f"mirrored into IDC-B : {m.get('applied')} applied, {m.get('bytes_copied', 0) / MIB:.1f} MiB copied "
              f"({m.get('mib_per_s')} MiB/s), ignored {m.get('ignored')}, dead letters {m.get('dead_letters')}")
        print(f"sync lag            : p50 {_s(m.get('lag_p50_s'))}, p99 {_s(m.get('lag_p99_s'))} (event -> applied)")
    print(f"verified            : {r.get('verified')} objects byte for byte: "
          f"{'OK' if r.get('verified_ok') else 'MISMATCH ' + str(r.get('verify_mismatch'))}")
    for dc, p in (r.get("prewarm") or {}).items():
        print(f"prewarm IDC-{dc}      : {p['summary']} (planned ETA {_s(p['eta_planned_s'])})")
    if r.get("dashboard_snapshot"):
        print(f"dashboard snapshot  : {r['dashboard_snapshot']}")
    print(f"time                : flow {r.get('flow_s')} s, stack up {r.get('stack_up_s')} s, "
          f"sample generation {r.get('generate_s')} s, total {r.get('total_s')} s")
    print(f"report              : {r['run_dir']}/report.json")


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"
