"""Secrets never leak: `xdc config check` and a short ingest + mirror flow with the stack's generated
credentials, then every log the run produced is searched for the secret values. secrets.env is the
one place they may live."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devtools.stack import SECRETS_FILE
from tests.mirror.chaos_support import child_env, write_config
from xdc.config import XdcConfig

ROOT = Path(__file__).resolve().parents[2]


def _xdc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdc.app.cli", *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=180)


def test_no_secret_value_in_any_output_or_log(xcfg: XdcConfig, stack_cfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    names = [f"XDC_{dc}_{kind}" for dc in xcfg.datacenters for kind in ("SECRET_KEY", "ACCESS_KEY")]
    values = {n: os.environ[n] for n in names}
    assert all(len(v) >= 8 for v in values.values())
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml")
    data = tmp_path / "data"
    for i in range(3):
        (data / f"f{i}.bin").parent.mkdir(parents=True, exist_ok=True)
        (data / f"f{i}.bin").write_bytes(os.urandom(1000))
    runs = [
        _xdc("config", "check", str(cfg_file)),
        _xdc("--config", str(cfg_file), "--dc", "A", "ingest", str(data), "--bucket", "idca-drive",
             "--prefix", f"camera/{tag}/"),
        _xdc("--config", str(cfg_file), "--dc", "B", "-v", "mirror", "run", "--once"),
        _xdc("--config", str(cfg_file), "--dc", "B", "dlq", "list"),
        # a failing run must not print them either
        _xdc("--config", str(cfg_file), "--dc", "B", "scan", "--bucket", "no-such-bucket"),
    ]
    for r in runs[:4]:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "****" in runs[0].stdout and '"applied": 3' in runs[2].stdout

    texts: dict[str, str] = {}
    for i, r in enumerate(runs):
        texts[f"run{i}.stdout"], texts[f"run{i}.stderr"] = r.stdout, r.stderr
    texts[str(cfg_file)] = cfg_file.read_text()
    run_dir = stack_cfg.base_dir
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.name != SECRETS_FILE
             and p.suffix in (".log", ".yaml", ".json", ".env", ".txt")]
    assert any(p.suffix == ".log" for p in files)
    for p in files:
        texts[str(p)] = p.read_text(errors="replace")
    for where, text in texts.items():
        for name, value in values.items():
            assert value not in text, f"{name} leaked into {where}"
    assert values[names[0]] in (run_dir / SECRETS_FILE).read_text()  # the one place they live
