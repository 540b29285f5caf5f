"""Two datacenters on two "hosts" joined by one WAN link, and that link cut for 30 s under load.

The stack runs in WAN mode (devtools/netns.py): A's and B's S3 endpoint, notifying proxy and Kafka
broker each in a network namespace of their own, the two joined by one veth pair shaped with
`tc tbf`. The mirror runs as a process inside B's namespace: it reaches B by its internal
addresses and A only by A's external ones, across the link, as the config says. The load generator
writes into A from this (root) namespace, over A's own LAN link, so it keeps writing while the WAN
is down. A real Prometheus scrapes the mirror's /metrics (token) and evaluates the lag alert's
expression, read from the chart's rule file.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import stack
from devtools.netns import Wan
from devtools.prometheus import Prometheus, running_prometheus
from tests.mirror.chaos_support import (
    DST_BUCKET,
    SRC_BUCKET,
    Workload,
    child_env,
    md5,
    write_config,
)
from tests.support import restore_env, site
from xdc.config import XdcConfig

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "xdc-mirror" / "files" / "alerts.rules.yaml"
LAG_ALERT = "XdcReplicationLagHigh"
CRED_VARS = [f"XDC_{dc}_{k}" for dc in ("A", "B") for k in ("ACCESS_KEY", "SECRET_KEY")]
TOKEN_ENV = "XDC_WAN_METRICS_TOKEN"
METRICS_PORT = 9100  # inside B's namespace every port is free
CUT_S = 30.0
# The rule's objective is 60 s of lag over a 5-minute rate window; a 30-s cut cannot cross 60 s,
# so the test evaluates the rule's own expression with both scaled by 1/6 (10 s, 50 s).
THRESHOLD_S, WINDOW = 10, "50s"
WAN_RATE = "100mbit"
REPORT: dict[str, Any] = {}

pytestmark = pytest.mark.slow


@dataclass
class WanStack:
    run: Path
    cfg: XdcConfig
    creds: dict[str, str]
    wan: Wan


@pytest.fixture(scope="module")
def wan_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WanStack]:
    """A stack of our own in WAN mode; `down` removes its namespaces and veths even when a test
    fails. stack.up puts its credentials into os.environ: the previous values are put back at once
    and the tests set these only while they run."""
    run = tmp_path_factory.mktemp("wan")
    saved = {k: os.environ.get(k) for k in CRED_VARS}
    try:
        cfg = stack.up(run, nodes=0, wan_rate=WAN_RATE,
                       config_overrides={"mirror": {"batch_max_records": 50, "batch_max_seconds": 0.2}})
        creds = {k: os.environ[k] for k in CRED_VARS}
        restore_env(saved)
        yield WanStack(run, cfg, creds, stack.wan(run))
    finally:
        restore_env(saved)
        stack.down(run)
    assert not _namespaces_left(run), "the stack's namespaces are still there after `down`"


def _namespaces_left(run: Path) -> list[str]:
    state = stack.StackState.load(run)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line for line in names.splitlines() if state and state.wan and json.loads(state.wan)["name"] in line]


@pytest.fixture
def creds(wan_stack: WanStack, monkeypatch: pytest.MonkeyPatch) -> WanStack:
    for k, v in wan_stack.creds.items():
        monkeypatch.setenv(k, v)
    return wan_stack


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _root_can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


# -- the mode itself ----------------------------------------------------------------------------
def test_each_datacenter_reaches_the_other_only_across_the_link(creds: WanStack) -> None:
    cfg, wan = creds.cfg, creds.wan
    a, b = cfg.dc("A"), cfg.dc("B")
    assert wan.internal("A") in a.s3.internal_url and wan.external("A") in a.s3.external_url
    assert a.kafka.external_bootstrap_servers and wan.external("A") in a.kafka.external_bootstrap_servers[0]
    s3 = _port(a.s3.external_url)
    kafka_ext = _port(a.kafka.external_bootstrap_servers[0])
    # B reaches A's external endpoints across the link, and A's internal ones not at all
    assert wan.can_connect("B", wan.external("A"), s3)
    assert wan.can_connect("B", wan.external("A"), kafka_ext)
    assert not wan.can_connect("B", wan.internal("A"), s3)
    # this namespace (the tests, Prometheus) reaches each datacenter's internal side, never the link
    assert _root_can_connect(wan.internal("A"), _port(a.s3.internal_url))
    assert _root_can_connect(wan.internal("B"), _port(b.s3.internal_url))
    # no connect tried: `ip route get` shows the root namespace has no way onto the link
    for dc in ("A", "B"):
        assert not wan.root_routes(wan.external(dc)), f"the root namespace routes to {wan.external(dc)}"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"
    # the link is shaped at both ends
    for dc, qdisc in wan.shaping().items():
        assert "tbf" in qdisc and "rate 100Mbit" in qdisc, (dc, qdisc)
    # a cut stops B -> A; a restore brings it back
    wan.cut()
    try:
        assert not wan.can_connect("B", wan.external("A"), s3, timeout_s=1.0)
    finally:
        wan.restore()
    assert wan.can_connect("B", wan.external("A"), s3, timeout_s=5.0)


# -- the cut ------------------------------------------------------------------------------------
def _lag_alert_expr() -> str:
    """The lag alert's expression from the chart's rule file, thresholds and window scaled."""
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == LAG_ALERT]
    assert len(rules) == 1, f"{LAG_ALERT} not in {RULES}"
    expr = rules[0]["expr"]
    scaled, n = re.subn(r">\s*60\b", f"> {THRESHOLD_S}", expr)
    scaled, w = re.subn(r"\[5m\]", f"[{WINDOW}]", scaled)
    assert n == 2 and w == 1, f"{LAG_ALERT}'s expression changed shape; update the test's scaling:\n{expr}"
    return scaled


STALL = "max(time() - xdc_replication_applied_through_timestamp_seconds)"
APPLIED_THROUGH = "min(xdc_replication_applied_through_timestamp_seconds)"


def _wait(what: str, ok: Any, timeout_s: float, every_s: float = 0.5) -> float:
    """Poll `ok()` until true; seconds it took. Fails the test at the deadline."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ok():
            return time.monotonic() - t0
        time.sleep(every_s)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


class Load:
    """The load generator: one Workload step every `period_s` in a thread (puts, overwrites and
    deletes on the data route camera/ and the metadata route lidar/), its timeline recorded."""

    def __init__(self, work: Workload, period_s: float = 0.05) -> None:
        self.work, self.period_s = work, period_s
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.steps: list[float] = []  # wall-clock time of each step
        self.thread = threading.Thread(target=self._run, name="load")

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.work.step()
                self.steps.append(time.time())
                self.stop.wait(self.period_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def _spawn_mirror(wan: Wan, cfg_file: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`xdc mirror run --follow` for B, inside B's namespace (`ip netns exec` execs: same PID)."""
    with open(log, "ab") as out:
        return subprocess.Popen([*wan.exec_prefix("B"), sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file),
                                 "--dc", "B", "mirror", "run", "--follow"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _peak(prom: Prometheus, expr: str, start: float, end: float) -> float:
    got = [float(v) for s in prom.query_range(expr, start, end) for _, v in s["values"]]
    return max(got) if got else float("nan")


def _final_check(cfg: XdcConfig, tag: str, work: Workload) -> dict[str, list[str]]:
    """Both sides against what the load generator wrote: listings (keys, sizes, ETag = MD5), the
    target's bytes read back and hashed, and the metadata route's catalog rows."""
    wrote = {k: v for k, v in work.written.items() if f"/{tag}/" in k}
    src = {o.key: o.etag for p in ("camera/", "lidar/") for o in site(cfg, "A", seen_from="A").store.list(
        SRC_BUCKET, f"{p}{tag}/")}
    dst_store = site(cfg, "B", seen_from="B").store
    dst = {o.key: o.etag for o in dst_store.list(DST_BUCKET, f"camera/{tag}/")}
    cat = {e.key: e.etag for e in site(cfg, "B").state.catalog.live_objects(DST_BUCKET)
           if e.key.startswith(f"lidar/{tag}/")}
    data_wrote = {k: v for k, v in wrote.items() if k.startswith("camera/")}
    meta_wrote = {k: v for k, v in wrote.items() if k.startswith("lidar/")}
    out: dict[str, list[str]] = {
        "source_differs": sorted(k for k in set(src) | set(wrote) if src.get(k) != wrote.get(k)),
        "data_lost": sorted(set(data_wrote) - set(dst)),
        "data_extra": sorted(set(dst) - set(data_wrote)),
        "data_diverged": sorted(k for k in set(dst) & set(data_wrote) if dst[k] != data_wrote[k]),
        "meta_lost": sorted(set(meta_wrote) - set(cat)),
        "meta_extra": sorted(set(cat) - set(meta_wrote)),
        "meta_diverged": sorted(k for k in set(cat) & set(meta_wrote) if cat[k] != meta_wrote[k]),
    }
    # ETags are the gateway's word; the bytes themselves, hashed here, are ours
    out["data_bytes_diverged"] = sorted(k for k in set(dst) & set(data_wrote)
                                        if md5(dst_store.get(DST_BUCKET, k)) != data_wrote[k])
    return out


def _converged(cfg: XdcConfig, tag: str, work: Workload) -> bool:
    wrote = {k for k in work.written if f"/{tag}/" in k}
    dst = {o.key: o.etag for o in site(cfg, "B", seen_from="B").store.list(DST_BUCKET, f"camera/{tag}/")}
    cat = {e.key for e in site(cfg, "B").state.catalog.live_objects(DST_BUCKET) if e.key.startswith(f"lidar/{tag}/")}
    return ({k for k in wrote if k.startswith("camera/")} == set(dst)
            and all(dst[k] == work.written[k] for k in dst)
            and {k for k in wrote if k.startswith("lidar/")} == cat)


def test_wan_cut_30s_under_load_mirror_resumes_by_itself_and_loses_nothing(
        creds: WanStack, tag: str, tmp_path: Path) -> None:
    cfg, wan = creds.cfg, creds.wan
    expr = _lag_alert_expr()
    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    env = child_env() | {TOKEN_ENV: token}
    cfg_file = write_config(cfg, tmp_path / "xdc.yaml", {
        "metrics": {"host": wan.internal("B"), "port": METRICS_PORT, "token_env": TOKEN_ENV}})
    mirror = _spawn_mirror(wan, cfg_file, tmp_path / "mirror.log", env)
    pid = mirror.pid
    servers = {r["name"]: r["pid"] for r in stack.status(creds.run)}
    try:
        with running_prometheus(tmp_path / "prom", [f"{wan.internal('B')}:{METRICS_PORT}"], interval_s=1.0,
                                token_file=token_file) as prom:
            # the mirror joined, probed A's log ends across the link and is current
            _wait("the mirror reports applied-through", lambda: (prom.value(f"time() - {APPLIED_THROUGH}") or 1e9) < 5,
                  120)
            assert "xdc.app.cli" in _cmdline(pid)
            work = Workload(cfg, tag, seed=15)
            with Load(work) as load:
                time.sleep(10)  # steady state
                assert not prom.query(expr), f"the lag alert's expression is over before the cut: {prom.query(expr)}"
                t_cut = time.time()
                wan.cut()
                try:
                    time.sleep(CUT_S)
                    over_during = prom.query(expr)
                finally:
                    wan.restore()
                t_restore = time.time()
                published_in_cut = sum(1 for t in load.steps if t_cut <= t < t_restore)
                # catch-up: every event published before the restore is applied in B
                catch_up_s = _wait("the mirror caught up after the restore (applied-through past the restore)",
                                   lambda: (prom.value(APPLIED_THROUGH) or 0) >= t_restore, 120)
                time.sleep(5)  # the load goes on after the catch-up
            assert not load.errors, load.errors
            t_load_end = time.time()
            converge_s = _wait("the target matches what the load wrote", lambda: _converged(cfg, tag, work), 120, 1.0)
            # back under: once the events of the cut have left the rule's (scaled) rate window
            clear_s = _wait("the lag alert's expression back under its threshold", lambda: not prom.query(expr), 180, 1.0)
            t_end = time.time()
            peak_lag = _peak(prom, STALL, t_cut, t_end)
            peak_p99 = _peak(prom, "histogram_quantile(0.99, sum by (le) (rate(xdc_replication_lag_seconds_bucket"
                                   f"[{WINDOW}])))", t_cut, t_end)
            prod_over = [s for s in prom.query_range(rules_expr(), t_cut, t_end) if s["values"]]
        alive_after = mirror.poll() is None and "xdc.app.cli" in _cmdline(pid)
        servers_after = {r["name"]: r["pid"] for r in stack.status(creds.run) if r["alive"]}
        diff = _final_check(cfg, tag, work)
    finally:
        _stop(mirror)
    REPORT.update({
        "wan_rate": WAN_RATE, "cut_s": CUT_S, "events": work.published, "events_during_cut": published_in_cut,
        "catch_up_s": round(catch_up_s, 1), "converged_after_load_s": round(converge_s, 1),
        "peak_lag_s": round(peak_lag, 1), "peak_p99_applied_lag_s": round(peak_p99, 1),
        "alert_expr_over_during_cut": bool(over_during), "alert_expr_clear_after_s": round(clear_s, 1),
        "production_threshold_crossed": bool(prod_over), "mirror_pid_same_and_alive": alive_after,
        "objects_lost": len(diff["data_lost"]) + len(diff["meta_lost"]),
        "objects_diverged": len(diff["data_diverged"]) + len(diff["meta_diverged"]) + len(diff["data_bytes_diverged"])
        + len(diff["data_extra"]) + len(diff["meta_extra"]),
        "load_end_to_converged_s": round(time.time() - t_load_end, 1),
    })
    print("\nWAN REPORT " + json.dumps(REPORT, sort_keys=True))
    assert alive_after, f"the mirror (pid {pid}) did not survive the cut: see {tmp_path / 'mirror.log'}"
    assert servers_after == servers, f"a server process died or changed: before {servers}, after {servers_after}"
    assert over_during, f"the lag alert's expression did not go over {THRESHOLD_S} s during a {CUT_S:.0f}-s cut"
    assert not any(diff.values()), {k: v[:5] for k, v in diff.items() if v}
    assert published_in_cut > 100, "the load did not go on during the cut"


def rules_expr() -> str:
    """The lag alert's expression exactly as the chart ships it (its 60-s objective)."""
    doc = yaml.safe_load(RULES.read_text())
    return next(r["expr"] for g in doc["groups"] for r in g["rules"] if r.get("alert") == LAG_ALERT)
