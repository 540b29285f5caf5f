"""A new kind of failure surfaces by itself: IDC-B's S3 endpoint starts refusing one prefix.

Nobody wrote a rule for it. The mirror runs as a real `xdc` process (with /metrics), writing into
IDC-B through a fault proxy in front of the real JuiceFS gateway. A first pass with nothing refused
records which log signatures exist; then the endpoint refuses PUTs under one prefix, and the next
pass must show a signature that did not exist before: counted in the process's /metrics by
component and signature, and listed first by `xdc problems` with a template free of keys and paths.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from devtools.faultproxy import FaultPlan, FaultProxy, Rule
from devtools.procs import free_port
from tests.mirror.chaos_support import child_env, write_config
from xdc.config import XdcConfig

ROOT = Path(__file__).resolve().parents[3]


def xdc(cfg: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg), *args], cwd=ROOT, env=child_env(),
                        capture_output=True, text=True, timeout=timeout)
    assert cp.returncode == 0, f"xdc {' '.join(args)}: {cp.stderr[-3000:]}"
    return cp


def files(root: Path, names: list[str]) -> Path:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(n.encode() * 100)
    return root


def scrape(port: int) -> dict[str, float]:
    """xdc_log_problems_total{component="mirror"} by signature, from the process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^xdc_log_problems_total\{component="mirror",signature="([0-9a-f]+)"\} ([0-9.e+]+)$',
                         text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


@pytest.mark.slow
def test_an_endpoint_refusing_one_prefix_shows_up_as_a_new_signature(xcfg: XdcConfig, tmp_path: Path,
                                                                      tag: str) -> None:
    up_b = xcfg.dc("B").s3.internal_url
    denied = [f"{tag}/denied/d{i}.bin" for i in range(3)]
    rules = [Rule("access_denied", f"/idcb-drive/camera/{tag}/denied/", ("PUT",))]
    plan = FaultPlan()
    with FaultProxy(up_b, plan) as proxy:
        port = free_port()
        cfg = write_config(xcfg, tmp_path / "xdc.yaml", {"datacenters": {"B": {"s3": {"internal_url": proxy.url}}},
                                                         "metrics": {"host": "127.0.0.1", "port": port}})
        # a first pass with nothing refused: the signatures that exist already
        xdc(cfg, "--dc", "A", "ingest", str(files(tmp_path / "one", [f"{tag}/ok/a{i}.bin" for i in range(3)])),
            "--bucket", "idca-drive", "--prefix", "camera/")
        xdc(cfg, "--dc", "B", "mirror", "run", "--once")
        before = {r["signature"] for r in json.loads(xdc(cfg, "problems", "--json").stdout)}

        # now the endpoint refuses PUTs under one prefix
        plan.rules = rules
        t_fault = time.time()
        xdc(cfg, "--dc", "A", "ingest", str(files(tmp_path / "two", [*denied, f"{tag}/ok/b0.bin"])),
            "--bucket", "idca-drive", "--prefix", "camera/")
        mirror = subprocess.Popen([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg), "--dc", "B", "mirror",
                                   "run", "--follow", "--max-seconds", "40"], cwd=ROOT, env=child_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen: dict[str, float] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    seen = {s: v for s, v in scrape(port).items() if s not in before}
                except OSError:
                    seen = {}  # not serving yet
                if sum(seen.values()) >= len(denied):
                    break
                time.sleep(0.3)
            refused = proxy.counts["access_denied"]
            # the config centre: the running mirror recorded the config it runs with
            running = json.loads(xdc(cfg, "config", "history", "--json").stdout)
        finally:
            mirror.terminate()
            out, err = mirror.communicate(timeout=60)
        assert refused >= len(denied), proxy.counts
    assert seen, f"no new signature in /metrics; mirror stderr: {err[-2000:]}"

    rows = json.loads(xdc(cfg, "problems", "--json").stdout)
    new = [r for r in rows if r["signature"] not in before]
    assert [r["signature"] for r in new] == list(seen), (new, seen)  # the same new kind, in the state
    (sig,) = new
    assert rows[0]["signature"] == sig["signature"]  # newest first
    assert sig["component"] == "mirror" and sig["dc"] == "B" and sig["new"]
    assert sig["first_seen"] >= t_fault and sig["hits"] == len(denied) == seen[sig["signature"]]
    assert "AccessDenied" in sig["template"] and "copy_failed" in sig["template"]
    for leak in (tag, "denied/", "idcb-drive", "idca-drive", ".bin", "127.0.0.1"):
        assert leak not in sig["template"], sig["template"]
    assert f"camera/{tag}/denied/" in sig["example"]  # the example names one occurrence, for the operator
    text = xdc(cfg, "problems").stdout
    assert text.startswith(f"NEW {sig['signature']}"), text

    (mine,) = [p for p in running["processes"] if p["component"] == "mirror" and p["dc"] == "B"]
    assert mine["pid"] == mirror.pid and mine["stopped_at"] is None and mine["current"]
    assert running["mixed"] is False and running["running_versions"] == [running["file_version"]]
    after = json.loads(xdc(cfg, "config", "history", "--json").stdout)
    (version,) = [v for v in after["versions"] if v["hash"].startswith(after["file_version"])]
    assert version["processes"] == 2 and version["running"] == 0  # the --once pass and the stopped --follow one
    assert after["processes"] == []  # SIGTERM ended it through its clean-up: recorded as stopped
