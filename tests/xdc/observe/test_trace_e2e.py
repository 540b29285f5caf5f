"""One object followed end to end through real processes: a 4K frame ingested into IDC-A, resized
there to 720p, the 720p frame mirrored into IDC-B, released and warmed on IDC-B's cache nodes.

Each step runs as its own `xdc` process, one after the other; the test notes the wall-clock window
of each. Then `xdc trace` (another process, reading the spans the processes left in both
datacenters' states) must show every step, in the order they happened, each inside the window of
the process that did it, and their durations must add up within the end-to-end time.

The stores here are the S3 gateways themselves, without the notifying proxy (`s3.notifications:
false`): xdc announces each write (ingest, the resize's derivative) with the trace's `traceparent`,
so one trace runs from the upload to the warm. A store's own notification carries no trace context;
then the mirror and the resize start the object's trace where its event arrives.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.samples import make_frame
from tests.mirror.chaos_support import (
    child_env,
    stores_without_notifications,
    write_config,
)
from tests.support import site
from xdc.config import XdcConfig

ROOT = Path(__file__).resolve().parents[3]
SLACK = 0.05  # seconds: spans are stamped inside a process, the window around it by this test


def xdc(*args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], float, float]:
    t0 = time.time()
    cp = subprocess.run([sys.executable, "-m", "xdc.app.cli", *args], cwd=ROOT, env=child_env(), capture_output=True,
                        text=True, timeout=timeout)
    t1 = time.time()
    assert cp.returncode == 0, f"xdc {' '.join(args)}: {cp.stderr[-3000:]}"
    return cp, t0, t1


def one(steps: list[dict[str, Any]], name: str, **attrs: Any) -> dict[str, Any]:
    got = [s for s in steps if s["name"] == name and all(s["attributes"].get(k) == v for k, v in attrs.items())]
    assert len(got) == 1, f"{name} {attrs}: {len(got)} steps: {[ (s['name'], s['key']) for s in steps]}"
    return got[0]


@pytest.mark.slow
def test_one_frame_from_ingest_in_a_to_a_warm_cache_node_in_b(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml", {"tracing": {"sample_ratio": 1.0, "export_interval_ms": 200},
                                                          **stores_without_notifications(xcfg)})
    c = ["--config", str(cfg_file)]
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "f0.jpg").write_bytes(make_frame(11))
    raw = f"camera/raw/{tag}/f0.jpg"
    derived_a, derived_b = f"idca-drive/camera/720p/{tag}/f0.jpg", f"idcb-drive/camera/720p/{tag}/f0.jpg"
    listing = tmp_path / "release.txt"
    listing.write_text(derived_a + "\n")

    windows: dict[str, tuple[float, float]] = {}
    _, *windows["ingest"] = xdc(*c, "--dc", "A", "ingest", str(frames), "--bucket", "idca-drive",
                                "--prefix", f"camera/raw/{tag}/")
    _, *windows["resize"] = xdc(*c, "--dc", "A", "resize", "run", "--once")
    cp, *windows["mirror"] = xdc(*c, "--dc", "B", "mirror", "run", "--once")
    assert json.loads(cp.stdout)["applied"] == 2  # the raw frame and its 720p derivative
    _, *windows["release"] = xdc(*c, "--dc", "A", "release", "--dataset", f"ds-{tag}", "--version", "v1",
                                 "--manifest", str(listing), "--datacenters", "B")
    cp, *windows["prewarm"] = xdc(*c, "--dc", "B", "prewarm", "follow", "--once")
    reports = json.loads(cp.stdout)
    assert [r["complete"] for r in reports] == [True], cp.stdout[-2000:]

    text, *_ = xdc(*c, "trace", derived_b)
    print("\n" + text.stdout)  # the trace, as an operator sees it
    got, *_ = xdc(*c, "trace", derived_b, "--json")
    tl = json.loads(got.stdout)
    steps = tl["steps"]

    assert {n["dc"]: n["key"] for n in tl["names"]} == {"A": derived_a, "B": derived_b}
    chain = [  # (process, span, what it must be) in the order things happened
        ("ingest", one(steps, "ingest.object"), f"idca-drive/{raw}"),
        ("ingest", next(s for s in steps if s["name"] == "s3.put" and s["component"] == "ingest"), None),
        ("ingest", next(s for s in steps if s["name"] == "kafka.publish" and s["key"] == f"idca-drive/{raw}"), None),
        ("resize", one(steps, "resize.frame"), f"idca-drive/{raw}"),
        ("resize", one(steps, "s3.get"), None),
        ("resize", one(steps, "resize"), None),
        ("resize", next(s for s in steps if s["name"] == "s3.put" and s["component"] == "resize"), None),
        ("resize", one(steps, "resize.publish"), derived_a),
        ("resize", next(s for s in steps if s["name"] == "kafka.publish" and s["key"] == derived_a), None),
        ("mirror", one(steps, "mirror.apply"), derived_b),
        ("mirror", one(steps, "s3.source_read"), None),
        ("mirror", one(steps, "s3.transfer"), None),
        ("mirror", one(steps, "s3.target_write"), None),
        ("mirror", one(steps, "state.commit"), derived_b),
        ("mirror", one(steps, "applied.publish"), derived_b),
        ("prewarm", next(s for s in steps if s["name"] == "cache.warm_file" and s["attributes"]["xdc.node"] == "b0"),
         derived_b),
        ("prewarm", one(steps, "cache.check_file"), derived_b),
    ]
    prev = None
    for proc, s, key in chain:
        lo, hi = windows[proc]
        assert lo - SLACK <= s["start"] <= s["end"] <= hi + SLACK, (proc, s["name"], s["start"] - lo, hi - s["end"])
        assert s["component"] == ("prewarm" if proc == "prewarm" else proc), (s["name"], s["component"])
        assert s["dc"] == ("B" if proc in ("mirror", "prewarm") else "A"), (s["name"], s["dc"])
        if key is not None:
            assert s["key"] == key, (s["name"], s["key"])
        if prev is not None:
            assert s["start"] >= prev["start"], f"{s['name']} started before {prev['name']}"
        prev = s
    # sequential steps: their durations add up within the end-to-end time
    leaves = [s for _, s, _ in chain if s["name"] not in ("ingest.object", "resize.frame", "resize.publish",
                                                            "mirror.apply")]
    assert sum(s["duration_s"] for s in leaves) <= tl["e2e_s"] + 1e-6
    assert abs(tl["start"] - chain[0][1]["start"]) < 1e-6
    assert windows["ingest"][0] - SLACK <= tl["start"] and tl["end"] <= windows["prewarm"][1] + SLACK
    # every cache node of B warmed it, while the prewarm process ran; checked after both
    warmed = tl["milestones_abs"]["warmed"]
    assert set(warmed) == {"B:b0", "B:b1"}
    assert all(windows["prewarm"][0] <= t <= windows["prewarm"][1] for t in warmed.values())
    assert tl["milestones_abs"]["checked"]["B"] >= max(warmed.values())
    ms = tl["milestones_abs"]
    assert ms["published"] <= ms["consumed"] <= ms["applied"]
    assert windows["resize"][0] <= ms["event_time"] <= windows["resize"][1]  # the 720p frame's own event
    # the slowest step is named, and it is the largest own time or wait on the path
    longest = max([s["self_s"] for s in steps] + [w["seconds"] for w in tl["waits"]])
    assert tl["slowest"]["label"] and abs(tl["slowest"]["seconds"] - longest) < 1e-6
    assert f"slowest step: {tl['slowest']['label']}" in text.stdout
    warm = chain[-2][1]
    assert warm["attributes"].get("xdc.read_store_s") is not None  # JuiceFS told the read and the write apart
    # the warm is linked to its node job, in the release's own trace: release (A) -> Kafka -> prewarm.run (B)
    (link,) = warm["links"]
    release_trace, node_span = link.split(":")
    spans = {s["span_id"]: s for dc in ("A", "B") for s in site(xcfg, dc).state.traces.spans([release_trace])}
    path, at = [], spans[node_span]
    while at is not None:
        path.append((at["dc"], at["name"]))
        at = spans.get(at["parent_id"] or "")
    assert path == [("B", "cache.warm_node"), ("B", "prewarm.warm"), ("B", "prewarm.run"), ("A", "kafka.publish"),
                    ("A", "release")], path
