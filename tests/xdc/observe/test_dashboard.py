"""The dashboard in a real headless browser (Debian's chromium), over data from a real run of the
local stack: ingest + mirror + lag snapshots, a dead letter, a quarantined object, prewarm rows."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

import pytest
from playwright.sync_api import expect

from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.support import produce, put_event, site, topo
from xdc.config import XdcConfig
from xdc.events import new_sequencer
from xdc.io.state import Conflict, Gap, NodeUsage
from xdc.metrics import Metrics, new_registry
from xdc.observe.dashboard import (
    dashboard_state,
    downsample,
    page_csp,
    serve_dashboard,
    snapshot_html,
)
from xdc.observe.lag import record_lag_snapshot

SRC = "idca-drive"
MIB = 1 << 20
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _mirror(cfg: XdcConfig) -> None:
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
        m.run(once=True)


def _lidar(cfg: XdcConfig, tag: str, n: int, name: str, age_s: float) -> None:
    t = time.time()
    produce(cfg, "A", cfg.dc("A").kafka.topics.events,
            [put_event(SRC, f"lidar/{tag}/{name}{i}.bin", seq=new_sequencer(), size=10_000 + i, t=t - age_s * (i + 1) / n)
             for i in range(n)])


@pytest.fixture
def populated(xcfg: XdcConfig, tmp_path: Path, tag: str) -> XdcConfig:
    """Three rounds of events, a mirror run and a lag snapshot after each, and a backlog left."""
    src = tmp_path / "frames"
    for i in range(4):
        p = src / tag / f"f{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i]) * (30_000 + 1000 * i))
    ingest(site(xcfg, "A"), src, SRC, "camera/")  # data mode: real copies into B
    for rnd, age in enumerate((2.0, 8.0, 0.5)):
        _lidar(xcfg, tag, 20, f"r{rnd}-", age)
        if rnd == 1:
            produce(xcfg, "A", xcfg.dc("A").kafka.topics.events, [(b"bad", b"{not json")])
        _mirror(xcfg)
        record_lag_snapshot(site(xcfg, "B"), metrics=Metrics(new_registry()))
    _lidar(xcfg, tag, 7, "backlog-", 1.0)  # produced, not mirrored: consumer lag 7
    record_lag_snapshot(site(xcfg, "B"), metrics=Metrics(new_registry()))

    b, a = site(xcfg, "B").state, site(xcfg, "A").state
    now = time.time()
    for route, missing, differ in (("camera", 1, 1), ("lidar", 0, 0)):
        b.verify.record({"route": route, "started": now - 5, "finished": now - 4, "trigger": "schedule",
                         "source_listed": 60, "target_listed": 59, "missing": missing, "extra": 0, "differ": differ,
                         "matched": 60 - missing - differ, "errors": 0, "repaired": 0, "sample": []})
    # a gap of another group (this test's mirror would repair a gap of its own at its next start)
    b.incidents.record_gap(Gap(f"{tag}-old-mirror.B", f"{tag}.events", 2, 10, 40, 30, ("camera", "lidar"),
                               "verify --repair started"))
    b.incidents.record_conflict(Conflict("camera", "idcb-drive", f"camera/{tag}/both.jpg", "A", "a" * 32, "B",
                                         "b" * 32, f"camera/{tag}/both.jpg.xdc-conflict-B-bbbbbbbbbbbb",
                                         "last_writer_wins"))
    b.incidents.record_quarantine("idcb-drive", f"camera/raw/{tag}/broken.png", "decode_failed",
                                  "truncated PNG <script>x</script>")
    b.prewarm.register("drive-2026-11", "v3", [f"idcb-drive/camera/{tag}/f{i}.jpg" for i in range(4)])
    b.prewarm.record_progress("drive-2026-11", files_done=4, files_total=4, bytes_done=126_000,
                              bytes_total=126_000, eta_s=0, cached_ratio=1.0, ready=True)
    b.prewarm.record_progress("lidar-night", files_done=37, files_total=120, bytes_done=3_700_000_000,
                              bytes_total=12_000_000_000, eta_s=412.0)
    a.prewarm.record_progress("lidar-night", files_done=120, files_total=120, bytes_done=12_000_000_000,
                              bytes_total=12_000_000_000, eta_s=0, cached_ratio=0.97, ready=False)
    b.prewarm.record_ready("drive-2026-11", "v3", ready=True, files=4, nbytes=126_000, cached_ratio=1.0,
                           manifest_uri="s3://idcb-drive/releases/drive.txt", now=time.time() - 300)
    a.prewarm.record_ready("lidar-night", "v1", ready=False, files=120, nbytes=12_000_000_000, cached_ratio=0.97,
                           manifest_uri=None, now=time.time())
    b.prewarm.record_nodes([NodeUsage("b0", 950 * MIB, 1000 * MIB, 0.9, 0.7), NodeUsage("b1", 300 * MIB, 1000 * MIB, 0.9, 0.7)])
    b.prewarm.record_eviction("drive-2026-10", "v2", "b0", 12, 64 * MIB, "room")
    return xcfg


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright import sync_api
    if not Path(CHROMIUM).exists():
        pytest.fail("no chromium at /usr/bin/chromium: scripts/setup.sh installs Debian's chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _truth(cfg: XdcConfig) -> dict[str, Any]:
    objects = bytes_ = 0
    for dc in cfg.datacenters:
        c = site(cfg, dc).state.catalog.counts()
        objects += c["objects"]
        bytes_ += c["bytes"]
    state = site(cfg, "B").state
    latest = {r["route"]: r for r in state.lag.latest()}
    history = state.lag.history(0)
    return {"objects": objects, "bytes": bytes_, "routes": state.catalog.route_totals(), "latest": latest,
            "p99_points": {r: sum(1 for h in history if h["route"] == r and h["p99"] is not None) for r in latest}}


def _shown(page: Any, key: str) -> str:
    return page.locator(f'[data-k="{key}"]').first.get_attribute("data-value")


def _check_page(page: Any, truth: dict[str, Any]) -> None:
    page.wait_for_selector("body[data-loaded='1'] section.dc[data-dc='B']")
    assert page.locator("section.dc").count() == 2  # every datacenter of the config
    assert int(_shown(page, "total-objects")) == truth["objects"]
    assert page.locator('[data-k="total-objects"]').first.inner_text() == f"{truth['objects']:,}"
    assert int(_shown(page, "total-bytes")) == truth["bytes"]
    assert int(_shown(page, "total-events")) == sum(r["events"] for r in truth["latest"].values())
    for route, t in truth["routes"].items():
        assert int(_shown(page, f"route-objects.B.{route}")) == t["objects"]
        assert int(_shown(page, f"route-bytes.B.{route}")) == t["bytes"]
        assert int(_shown(page, f"route-events.B.{route}")) == truth["latest"][route]["events"]
    assert int(_shown(page, "route-consumer-lag.B.lidar")) == 7
    assert int(_shown(page, "consumer-lag")) == 7  # camera and lidar share one topic: counted once
    assert int(_shown(page, "route-pending-objects.B.lidar")) == 7
    for route, n in truth["p99_points"].items():
        pts = page.locator(f'svg.lag[data-route="{route}"] circle.p99').count()
        assert pts == n and n >= 3, route
    assert page.locator('svg.lag[data-route="lidar"] polyline.p99').count() == 1
    assert page.locator("svg.lag line.objective").count() == 2
    assert page.locator("table.dead-letters tbody tr").count() == 1
    assert "bad_json" in page.locator("table.dead-letters").inner_text()
    q = page.locator("table.quarantine")
    assert "<script>x</script>" in q.inner_text()  # shown as text, never run as HTML
    b = page.locator("section.dc[data-dc='B']")
    assert "ready" in b.locator("tr[data-dataset='drive-2026-11']").inner_text()
    night = b.locator("tr[data-dataset='lidar-night']").inner_text()
    assert "warming" in night and "6 m 52 s" in night and "37 / 120" in night
    assert "not ready" in page.locator("section.dc[data-dc='A'] tr[data-dataset='lidar-night']").inner_text()
    # each route's last verify, the gaps and the conflicts
    assert int(_shown(page, "route-verify-drift.B.camera")) == 2 and int(_shown(page, "route-verify-drift.B.lidar")) == 0
    assert "2 differ (1 missing, 0 extra, 1 changed)" in b.locator("tr[data-route='camera'] td.verify").inner_text()
    assert "in sync" in b.locator("tr[data-route='lidar'] td.verify").inner_text()
    gaps = b.locator("table.gaps").inner_text()
    assert "40" in gaps and "verify --repair started" in gaps and "pending" in gaps
    assert "xdc-conflict-B" in b.locator("table.conflicts").inner_text()
    assert re.search(r"\b[56] m \d+ s ago", b.locator("tr[data-dataset='drive-2026-11']").inner_text())  # ready since
    for node, used, fill in (("b0", 950 * MIB, 0.95), ("b1", 300 * MIB, 0.3)):
        assert int(_shown(page, f"node-used.B.{node}")) == used
        assert float(_shown(page, f"node-fill.B.{node}")) == fill
        assert (float(_shown(page, f"node-high.B.{node}")), float(_shown(page, f"node-low.B.{node}"))) == (0.9, 0.7)
    assert "bad" in b.locator("tr[data-node='b0'] .fill").get_attribute("class")  # over its high watermark
    assert "room made: drive-2026-10@v2 from b0 (64.0 MiB" in b.inner_text()
    assert page.locator("section.dc[data-dc='A'] table.cache-nodes").count() == 0


@pytest.mark.slow
def test_dashboard_in_browser_shows_catalog_numbers_and_refreshes(populated: XdcConfig, browser: Any,
                                                                  test_output: Path) -> None:
    cfg = populated
    truth = _truth(cfg)
    assert truth["routes"]["lidar"]["objects"] == 60 and truth["routes"]["camera"]["objects"] == 4
    with serve_dashboard(topo(cfg, "B")) as srv:
        assert srv.host == "127.0.0.1"
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        hosts: set[str] = set()
        page.on("request", lambda r: hosts.add(urlsplit(r.url).netloc))
        page.goto(srv.url + "/")
        _check_page(page, truth)
        page.screenshot(path=str(test_output / "dashboard.png"), full_page=True)
        assert hosts == {f"127.0.0.1:{srv.port}"}  # nothing fetched from anywhere else

        state = json.loads(urlopen(srv.url + "/api/state", timeout=10).read())
        assert [d["name"] for d in state["datacenters"]] == list(cfg.datacenters)
        ready = json.loads(urlopen(srv.url + "/api/ready", timeout=10).read())["datasets"]
        assert {(r["dc"], r["dataset"], r["version"], r["ready"], r["cached_ratio"]) for r in ready} == {
            ("B", "drive-2026-11", "v3", True, 1.0), ("A", "lidar-night", "v1", False, 0.97)}

        # the static snapshot (what the demo leaves in its run directory) shows the same numbers
        html = snapshot_html(topo(cfg, "B"))
        assert "</script><script" not in html.split('id="state"')[1].split("</script>")[0]
        path = test_output / "dashboard-snapshot.html"
        path.write_text(html)
        static = browser.new_page(viewport={"width": 1440, "height": 1000})
        schemes: set[str] = set()
        static.on("request", lambda r: schemes.add(urlsplit(r.url).scheme))
        static.goto(path.as_uri())
        _check_page(static, truth)
        assert "static snapshot" in static.locator("#live").inner_text()
        assert schemes == {"file"}
        static.close()

        _mirror(cfg)  # the backlog is applied: the open page picks it up on its own
        # a locator wait (Playwright's own isolated world): the page's CSP forbids eval of a predicate
        expect(page.locator('[data-k="total-objects"]').first).to_have_attribute(
            "data-value", str(truth["objects"] + 7), timeout=30_000)
        page.close()


def test_downsample_keeps_worst_lag_per_bucket() -> None:
    hist: list[list[float | None]] = [[float(t), 0.1, 0.2] for t in range(1000)]
    hist[500][2] = 99.0
    out = downsample(hist, 100)
    assert len(out) == 100 and max(h[2] or 0 for h in out) == 99.0
    assert downsample(hist[:5], 100) == hist[:5]


def test_state_of_an_empty_config_has_every_datacenter(xcfg: XdcConfig) -> None:
    st = dashboard_state(topo(xcfg, "B"))
    assert [d["name"] for d in st["datacenters"]] == ["A", "B"]
    assert st["totals"]["objects"] == 0 and st["totals"]["worst_p99"] is None
    (b,) = [d for d in st["datacenters"] if d["name"] == "B"]
    assert {r["name"] for r in b["routes"]} == {"camera", "lidar"}
    assert all(r["latest"] is None and r["history"] == [] and r["verify"] is None for r in b["routes"])
    assert b["gaps"] == [] and b["conflicts"] == []


def test_page_csp_allows_only_the_page_own_script() -> None:
    page = '<p>x</p><script>let a = 1;</script><script>boot()</script>'
    digest = base64.b64encode(hashlib.sha256(b"let a = 1;").digest()).decode()
    csp = page_csp(page)
    assert f"'sha256-{digest}'" in csp and csp.count("'sha256-") == 2
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
