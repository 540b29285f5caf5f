"""The dashboard's observation panels in a real headless browser (Debian's chromium): one object's
trace as a waterfall, log signatures, and the processes with the config version each runs.

The data comes from a real traced run on the local stack: ingest into IDC-A, the mirror into IDC-B,
a prewarm on IDC-B's JuiceFS nodes, with tracing at 100 % and problem signatures installed.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import quote, urlsplit
from urllib.request import urlopen

import pytest

from cache_client.prewarm.pipeline import Request, run_prewarm
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.mirror.chaos_support import stores_without_notifications, variant
from tests.support import site, topo
from xdc.config import XdcConfig
from xdc.metrics import Metrics, new_registry
from xdc.observe import configs, telemetry
from xdc.observe.dashboard import serve_dashboard, snapshot_html
from xdc.observe.timeline import timeline
from xdc.topology import Topology

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def traced(xcfg: XdcConfig, tmp_path: Path, tag: str) -> XdcConfig:
    # xdc announces the writes (no notifying proxy): one trace from the upload in A to the warm in B
    cfg = variant(xcfg, {"tracing": {"sample_ratio": 1.0, "export_interval_ms": 100},
                         **stores_without_notifications(xcfg)})
    src = tmp_path / "src"
    for i in range(2):
        p = src / tag / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i + 1]) * (50_000 + 1000 * i))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"idca-drive/camera/{tag}/f{i}.bin\n" for i in range(2)))
    with telemetry.start(Topology(cfg, "A"), "demo", metrics=Metrics(new_registry())):
        ingest(site(cfg, "A"), src, "idca-drive", "camera/")
        with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
            assert m.run(once=True).applied == 2
        assert run_prewarm(site(cfg, "B"), Request(str(listing), f"ds-{tag}", "v1")).complete
        logging.getLogger("xdc.demo").warning("disk %s is full at %d%%", f"/var/cache/{tag}", 97)
    b = site(cfg, "B").state.configs
    b.record_start(config_hash=configs.config_hash(cfg), body={}, component="mirror", host="h1", pid=101, dc="B")
    b.record_start(config_hash="0" * 64, body={}, component="resize", host="h2", pid=202, dc="B")
    return cfg


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


def _rows(page: Any) -> list[dict[str, Any]]:
    return page.eval_on_selector_all("#waterfall .row", """rows => rows.map(r => ({
        step: r.dataset.step, dc: r.dataset.dc, offset: +r.dataset.offset, duration: +r.dataset.duration,
        node: r.dataset.node, slowest: r.classList.contains('slowest'),
        left: parseFloat(r.querySelector('.track > span').style.left)}))""")


@pytest.mark.slow
def test_trace_waterfall_problems_and_config_versions_in_browser(traced: XdcConfig, browser: Any, tag: str,
                                                                 test_output: Path) -> None:
    cfg = traced
    key_b = f"idcb-drive/camera/{tag}/f0.bin"
    expected = timeline(topo(cfg, "B"), key_b)
    assert expected is not None
    # the path read straight from the states: what the waterfall must show, in this order
    names = [(s.dc, s.name) for s in expected.steps]
    for must in [("A", "ingest.object"), ("A", "s3.put"), ("A", "kafka.publish"), ("B", "mirror.apply"),
                 ("B", "s3.target_write"), ("B", "state.commit"), ("B", "cache.warm_file"), ("B", "cache.check_file")]:
        assert must in names, must
    with serve_dashboard(topo(cfg, "B")) as srv:
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        hosts: set[str] = set()
        page.on("request", lambda r: hosts.add(urlsplit(r.url).netloc))
        page.goto(srv.url + "/")
        page.wait_for_selector("body[data-loaded='1'] #processes")

        # processes and their config: two versions run, the other one is flagged
        assert page.locator("#processes").get_attribute("data-mixed") == "1"
        assert page.locator("#mixed-versions").is_visible()
        stale = page.locator("#processes tr.stale")
        assert stale.count() == 1 and "different version" in stale.inner_text()
        assert stale.get_attribute("data-process") == "B/resize/h2/202"
        ok = page.locator("#processes tr[data-process='B/mirror/h1/101']")
        assert ok.get_attribute("data-config") == configs.short(configs.config_hash(cfg)) and "this config" in ok.inner_text()

        # problems: the warning's signature, new, counted once, with no path in its template
        row = page.locator("#problems tr").filter(has_text="disk <path> is full at <n>%")
        assert row.count() == 1 and "new" in row.inner_text() and tag not in row.locator("td").nth(8).inner_text()
        sig = row.get_attribute("data-signature")
        assert page.locator(f'[data-k="problem-hits.{sig}"]').get_attribute("data-value") == "1"

        # the trace panel: the object typed in -> its waterfall, steps in the order they happened
        page.fill("#trace-key", key_b)
        page.click("#trace-go")
        page.wait_for_selector(f"#waterfall[data-key='{key_b}']")
        rows = _rows(page)
        assert [(r["dc"], r["step"]) for r in rows] == names
        assert [r["offset"] for r in rows] == sorted(r["offset"] for r in rows)
        assert [r["left"] for r in rows] == sorted(r["left"] for r in rows)  # bars drawn where they start
        warmed = {r["node"] for r in rows if r["step"] == "cache.warm_file"}
        assert warmed == {"b0", "b1"}
        slow = [r for r in rows if r["slowest"]]
        if expected.slowest["kind"] == "step":
            assert [r["step"] for r in slow] == [expected.slowest["name"]]
        assert expected.slowest["label"] in page.locator("#trace-slowest").inner_text()
        assert abs(float(page.locator("#trace-e2e").get_attribute("data-value")) - expected.e2e_s) < 1e-6
        page.screenshot(path=str(test_output / "dashboard-trace.png"), full_page=True)

        # the API behind it, and an unknown key
        api = json.loads(urlopen(f"{srv.url}/api/trace?key={quote(key_b)}", timeout=10).read())
        assert api["trace_id"] == expected.trace_id
        with pytest.raises(HTTPError) as err:
            urlopen(f"{srv.url}/api/trace?key=idcb-drive/nope", timeout=10)
        assert err.value.code == 404
        assert hosts == {f"127.0.0.1:{srv.port}"}
        page.close()

    # a static snapshot carries the most recently traced object's waterfall
    html = snapshot_html(topo(cfg, "B"))
    path = test_output / "dashboard-trace-snapshot.html"
    path.write_text(html)
    static = browser.new_page(viewport={"width": 1500, "height": 1100})
    static.goto(path.as_uri())
    static.wait_for_selector("#waterfall")
    shown = static.locator("#waterfall").get_attribute("data-key")
    assert shown in {f"idcb-drive/camera/{tag}/f{i}.bin" for i in range(2)} | \
        {f"idca-drive/camera/{tag}/f{i}.bin" for i in range(2)}
    assert len(_rows(static)) > 5
    static.close()
