"""The Grafana dashboard JSON: structure, variables, and PromQL that names only real metrics.

Every panel query is also parsed by promtool (as a recording rule, with Grafana's variables
substituted), so a typo in PromQL fails here rather than on an operator's screen.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from xdc.metrics import Metrics, new_registry
from xdc.observe.http import serve

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "xdc-mirror" / "files" / "grafana-dashboard.json"

METRIC_RE = re.compile(r"\bxdc_[a-z0-9_]+\b")
SELECTOR_RE = re.compile(r"\b(xdc_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
VARIABLE_RE = re.compile(r"\$\{?(\w+)")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s"}

# What operators must be able to see (issue 6): each needs at least one panel query.
MUST_SHOW = {
    "xdc_replication_lag_seconds_bucket", "xdc_consumer_lag_messages", "xdc_objects_pending",
    "xdc_bytes_pending", "xdc_events_applied_total", "xdc_events_failed_total", "xdc_dead_letters_total",
    "xdc_resize_frames_total", "xdc_prewarm_bytes_done", "xdc_prewarm_bytes_total",
    "xdc_prewarm_files_done", "xdc_prewarm_files_total", "xdc_prewarm_eta_seconds", "xdc_cached_ratio",
    "xdc_dataset_ready",
}


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows nest their panels
    return out


def exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


def variable_queries(dash: dict[str, Any]) -> list[str]:
    return [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]


def test_dashboard_header(dash: dict[str, Any]) -> None:
    assert dash["uid"] == "xdc-mirror"
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["title"]


def test_variables(dash: dict[str, Any]) -> None:
    by_name = {v["name"]: v for v in dash["templating"]["list"]}
    assert by_name["datasource"]["type"] == "datasource"
    assert by_name["datasource"]["query"] == "prometheus"
    for name in ("route", "dc", "dataset"):
        assert by_name[name]["type"] == "query"
        assert by_name[name]["datasource"]["uid"] == "${datasource}"
        assert by_name[name]["includeAll"] and by_name[name]["allValue"] == ".*"


def test_panels_layout_ids_and_datasource(dash: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].strip(), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_queries_use_defined_metrics_labels_and_variables(dash: dict[str, Any]) -> None:
    series = Metrics(new_registry()).series_labels()
    all_labels = set().union(*series.values())
    variables = {v["name"] for v in dash["templating"]["list"]} | GRAFANA_BUILTINS
    problems = []
    texts = exprs(dash) + variable_queries(dash)
    for expr in texts:
        problems += [f"unknown metric {n}: {expr}" for n in METRIC_RE.findall(expr) if n not in series]
        for name, matchers in SELECTOR_RE.findall(expr):
            problems += [f"{name} has no label {lb!r}: {expr}" for lb in MATCHER_RE.findall(matchers)
                         if name in series and lb not in series[name]]
        for group in GROUPING_RE.findall(expr):
            problems += [f"unknown label {lb!r}: {expr}" for lb in (x.strip() for x in group.split(","))
                         if lb and lb not in all_labels]
        problems += [f"undefined variable ${v}: {expr}" for v in VARIABLE_RE.findall(expr) if v not in variables]
    assert problems == []
    used = {n for e in exprs(dash) for n in METRIC_RE.findall(e)}
    assert MUST_SHOW <= used, f"not on the dashboard: {sorted(MUST_SHOW - used)}"


def test_queries_parse_as_promql(tmp_path: Path, dash: dict[str, Any]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found on PATH: install Debian package 'prometheus' (scripts/setup.sh does)")

    def concrete(expr: str) -> str:
        expr = re.sub(r"\$\{?__\w+\}?", "5m", expr)  # $__rate_interval and friends are durations
        return re.sub(r"\$\{?\w+\}?", ".*", expr)  # label variables are regexes

    rules = [{"record": f"xdc:dashboard_panel_{i}", "expr": concrete(e)} for i, e in enumerate(exprs(dash))]
    path = tmp_path / "panels.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- live: a real Prometheus scrapes our /metrics; every panel query must return data ---------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _feed(m: Metrics, step: int) -> None:
    """One tick of plausible activity on every metric (counters must move for rate())."""
    now = time.time()
    lag = m.replication_lag_seconds.labels("frames", "idc-a", "idc-b")
    lag.observe(2.0 + step % 5)
    lag.observe(0.5)
    m.events_applied_total.labels("frames", "put").inc()
    m.events_applied_total.labels("frames", "delete").inc()
    m.bytes_copied_total.labels("frames").inc(1 << 20)
    m.last_apply_timestamp_seconds.labels("frames").set(now)
    m.set_consumer_lag("xdc-mirror", "s3-events", 0, highwater=100 + step, committed=90)
    m.objects_pending.labels("frames").set(10)
    m.bytes_pending.labels("frames").set(10 << 20)
    m.events_failed_total.labels("frames", "integrity").inc()
    m.events_ignored_total.labels("frames", "stale").inc()
    m.dead_letters_total.labels("s3-events", "bad_json").inc()
    m.resize_frames_total.labels("resized").inc()
    m.resize_seconds.observe(0.04)
    m.resize_bytes_in_total.inc(3_260_000)
    m.resize_bytes_out_total.inc(320_000)
    m.set_prewarm("ds1", "idc-b", files_done=step, files_total=1000, bytes_done=step << 20, bytes_total=1000 << 20,
                  eta_seconds=600.0, deadline=now + 3600)
    m.set_dataset_state("ds1", "idc-b", cached_ratio=step / 1000, ready=False)


@pytest.mark.slow
@pytest.mark.servers  # starts its own
def test_every_panel_returns_data_from_a_real_prometheus(tmp_path: Path, dash: dict[str, Any]) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus not found on PATH: install Debian package 'prometheus' (scripts/setup.sh does)")
    m = Metrics(new_registry())
    m.init_route("frames")
    stop = threading.Event()

    def feeder() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            _feed(m, step)
            stop.wait(0.25)

    server = serve(registry=m.registry)
    feed = threading.Thread(target=feeder, daemon=True)
    feed.start()
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "helm" / "xdc-mirror" / "files" / "alerts.rules.yaml")],
        "scrape_configs": [{"job_name": "xdc", "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}],
    }))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        # rate() needs two scrapes with movement; give each query until a generous deadline.
        pending = {e: re.sub(r"\$\{?\w+\}?", ".*", e.replace("$__rate_interval", "1m")) for e in exprs(dash)}
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline and proc.poll() is None:
            for original, expr in list(pending.items()):
                try:
                    result = _api(base, "/api/v1/query", query=expr)["data"]["result"]
                except OSError:
                    break  # not listening yet
                if result:
                    del pending[original]
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        assert not pending, f"panel queries with no data: {sorted(pending)}"
        # The alert rules evaluate cleanly against real exposition (no many-to-many matching etc.).
        health: dict[str, tuple[str, str]] = {}
        while time.monotonic() < deadline:
            groups = _api(base, "/api/v1/rules")["data"]["groups"]
            health = {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
            if health and all(h != "unknown" for h, _ in health.values()):  # evaluated at least once
                break
            time.sleep(0.5)
        alerts = yaml.safe_load((ROOT / "helm" / "xdc-mirror" / "files" / "alerts.rules.yaml").read_text())
        names = {r["alert"] for g in alerts["groups"] for r in g["rules"] if "alert" in r}
        assert set(health) == names and all(h == "ok" for h, _ in health.values()), health
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        stop.set()
        feed.join()
        server.stop()
