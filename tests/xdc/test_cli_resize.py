"""`xdc resize file` as a user runs it (a real process): crashes contained, libvips quiet unless -v."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from resize.sandbox import CRASH_ENV
from tests.resize.corpus import jpeg, with_icc
from devtools.samples import make_frame, render_frame

ROOT = Path(__file__).resolve().parents[2]


def xdc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    full.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "xdc.app.cli", *args], capture_output=True, text=True,
                          env=full, timeout=300, check=False)


def test_the_cmyk_frame_of_issue_15_resizes(tmp_path: Path) -> None:
    # This exact frame killed the CLI with SIGSEGV (exit -11) before the fix.
    src = tmp_path / "cmyk.jpg"
    render_frame(1, 1920, 1080).convert("CMYK").save(src, "JPEG", quality=90)
    r = xdc("resize", "file", str(src), str(tmp_path / "out.jpg"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{src}: 1920x1080 -> 1280x720 (resized)"
    im = Image.open(tmp_path / "out.jpg")
    assert (im.mode, im.size) == ("RGB", (1280, 720))


def test_a_native_crash_is_a_clear_error_not_a_dead_cli(tmp_path: Path) -> None:
    src = tmp_path / "segv-here.jpg"
    src.write_bytes(make_frame(1, 1920, 1080))
    out = tmp_path / "out.jpg"
    r = xdc("resize", "file", str(src), str(out), env={CRASH_ENV: "segv-here"})
    assert r.returncode == 2, (r.returncode, r.stderr)  # not -11: the CLI itself did not die
    assert r.stderr.strip().splitlines()[-1] == f"xdc: error: worker_crashed: SIGSEGV while resizing {src}"
    assert "Traceback" not in r.stderr and "Fatal Python error" not in r.stderr  # the child's dump is kept aside
    assert not out.exists() and not out.with_name("out.jpg.part").exists()


def test_libvips_log_lines_only_with_verbose(tmp_path: Path) -> None:
    # A CMYK frame with a corrupt embedded profile: libvips warns ("corrupt profile") and falls
    # back to its own CMYK profile. Before: that warning and a dozen INFO lines on every run.
    src = tmp_path / "f.jpg"
    src.write_bytes(with_icc(jpeg(render_frame(2, 1920, 1080).convert("CMYK")), b"not a profile" * 40))
    quiet = xdc("resize", "file", str(src), str(tmp_path / "a.jpg"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    loud = xdc("-v", "resize", "file", str(src), str(tmp_path / "b.jpg"))
    assert loud.returncode == 0, loud.stderr
    assert "WARNING pyvips (resize child): VIPS: corrupt profile" in loud.stderr
    assert "pyvips (resize child): VIPS: reducev" in loud.stderr
    assert (tmp_path / "a.jpg").read_bytes() == (tmp_path / "b.jpg").read_bytes()


def test_a_bad_file_is_an_error_with_its_reason(tmp_path: Path) -> None:
    src = tmp_path / "cut.jpg"
    src.write_bytes(make_frame(3, 1920, 1080)[:5000])
    r = xdc("resize", "file", str(src), str(tmp_path / "out.jpg"))
    assert r.returncode == 2 and r.stderr.startswith("xdc: error: truncated"), r.stderr
