"""`xdc demo` (the README's first command, on fewer frames) runs the whole flow and cleans up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import stack


@pytest.mark.slow
@pytest.mark.servers  # starts its own
def test_demo_runs_the_whole_flow_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    try:
        r = subprocess.run([sys.executable, "-m", "xdc.app.cli", "demo", "--frames", "12", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "xdc-mirror demo report" in r.stdout and "dashboard (live while the demo runs): http://127.0.0.1:" in r.stdout
        report = json.loads((out / "report.json").read_text())
        assert report["verified_ok"] and report["prewarm_ok"]
        assert report["resize"]["results"] == {"resized": 12}
        assert report["mirror"]["dead_letters"] == 0 and report["mirror"]["applied"] >= 12 + 12 + 5
        html = (out / "dashboard.html").read_text()
        assert "EMBEDDED" in html and '"camera"' in html  # the data is in the page, drawn by its script
        assert stack.status(out / "stack") == []  # every process and mount it started is gone
    finally:
        stack.down(out / "stack")
