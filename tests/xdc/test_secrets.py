"""Secrets never leak: `xdc config check` and a short ingest + mirror flow with the stack's generated
credentials, then every log the run produced is searched for the secret values. secrets.env is the
one place they may live."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.stack import SECRETS_FILE
from tests.conftest import SecureStack
from tests.mirror.chaos_support import child_env, write_config
from tests.support import produce, read_topic
from xdc.config import XdcConfig

ROOT = Path(__file__).resolve().parents[2]


def _xdc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdc.app.cli", *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=180)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape_until(url: str, proc: subprocess.Popen[str], done: Callable[[str], bool], timeout_s: float = 90) -> str:
    """The process's /metrics once `done` holds of it; fails at the deadline or if the process ends."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the mirror ended early ({proc.returncode})"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            text = ""  # not serving yet
        if text and done(text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"metrics never showed the run's work: {text[-2000:]}")


def _sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_no_secret_value_in_any_output_or_log(xcfg: XdcConfig, stack_cfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    """Logs and outputs, and also what a run leaves elsewhere: metric labels (a scrape of the running
    mirror), trace attributes (every span kept, sampling 1.0, in the state's spans table), dead
    letters (a malformed event, on the dead-letter topic's log segments and in the state)."""
    names = [f"XDC_{dc}_{kind}" for dc in xcfg.datacenters for kind in ("SECRET_KEY", "ACCESS_KEY")]
    values = {n: os.environ[n] for n in names}
    assert all(len(v) >= 8 for v in values.values())
    port = _free_port()
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml", {"tracing": {"sample_ratio": 1.0},
                                                          "metrics": {"port": port}})
    data = tmp_path / "data"
    for i in range(3):
        (data / f"f{i}.bin").parent.mkdir(parents=True, exist_ok=True)
        (data / f"f{i}.bin").write_bytes(os.urandom(1000))
    produce(xcfg, "A", xcfg.dc("A").kafka.topics.events, [(b"bad", b"{not json")])  # a dead letter to come
    runs = [
        _xdc("config", "check", str(cfg_file)),
        _xdc("--config", str(cfg_file), "--dc", "A", "ingest", str(data), "--bucket", "idca-drive",
             "--prefix", f"camera/{tag}/"),
    ]
    mirror = subprocess.Popen([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file), "--dc", "B", "-v",
                               "mirror", "run", "--follow"], cwd=ROOT, env=child_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        scraped = _scrape_until(f"http://127.0.0.1:{port}/metrics", mirror,
                                lambda t: _sample(t, "xdc_events_applied_total") >= 3
                                and _sample(t, "xdc_dead_letters_total") >= 1)
    finally:
        mirror.terminate()
        out, err = mirror.communicate(timeout=60)
    runs += [
        subprocess.CompletedProcess(mirror.args, mirror.returncode, out, err),
        _xdc("--config", str(cfg_file), "--dc", "B", "dlq", "list"),
        _xdc("--config", str(cfg_file), "--dc", "B", "trace", f"idca-drive/camera/{tag}/f0.bin"),
        # a failing run must not print them either
        _xdc("--config", str(cfg_file), "--dc", "B", "scan", "--bucket", "no-such-bucket"),
    ]
    for r in (runs[0], runs[1], runs[3], runs[4]):  # runs[2]: the mirror, stopped by SIGTERM
        assert r.returncode == 0, r.stderr[-2000:]
    assert "****" in runs[0].stdout and "trace of" in runs[4].stdout, runs[4].stdout[-2000:]
    assert "bad_json" in runs[3].stdout or "bad_shape" in runs[3].stdout, runs[3].stdout[-2000:]

    texts: dict[str, str] = {"metrics scrape": scraped}
    for i, r in enumerate(runs):
        texts[f"run{i}.stdout"], texts[f"run{i}.stderr"] = r.stdout, r.stderr
    texts[str(cfg_file)] = cfg_file.read_text()
    run_dir = stack_cfg.base_dir
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.name != SECRETS_FILE
             and p.suffix in (".log", ".yaml", ".json", ".env", ".txt")]
    assert any(p.suffix == ".log" for p in files)
    # the state (spans with their attributes, dead letters, config history): SQLite files, read raw
    dbs = [p for p in (xcfg.base_dir / tag).rglob("*.db") if p.is_file()]
    spans = b"".join(p.read_bytes() for p in dbs)
    assert b"mirror.apply" in spans and b"s3.transfer" in spans, "no span reached the state"
    for p in [*files, *dbs]:
        texts[str(p)] = p.read_bytes().decode("latin-1")
    for where, text in texts.items():
        for name, value in values.items():
            assert value not in text, f"{name} leaked into {where}"
    assert values[names[0]] in (run_dir / SECRETS_FILE).read_text()  # the one place they live


def test_no_kafka_password_in_any_output_or_log(secure_cfg: XdcConfig, secure_stack: SecureStack, tag: str,
                                                tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same on the stack whose brokers take only SASL_SSL, with the Kafka clients' own logs at
    DEBUG in this process, and a run with a wrong password (its error must name neither)."""
    names = [f"XDC_{dc}_{kind}" for dc in secure_cfg.datacenters for kind in ("KAFKA_PASSWORD", "SECRET_KEY")]
    values = {n: os.environ[n] for n in names}
    assert all(len(v) >= 8 for v in values.values())
    cfg_file = write_config(secure_cfg, tmp_path / "xdc.yaml")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"f{i}.bin").write_bytes(os.urandom(1000))
    runs = [
        _xdc("config", "check", str(cfg_file)),
        _xdc("--config", str(cfg_file), "--dc", "A", "ingest", str(data), "--bucket", "idca-drive",
             "--prefix", f"camera/{tag}/"),
        _xdc("--config", str(cfg_file), "--dc", "B", "-v", "mirror", "run", "--once"),
        _xdc("--config", str(cfg_file), "--dc", "B", "-v", "dlq", "list"),
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert '"applied": 3' in runs[2].stdout
    wrong = dict(os.environ, XDC_B_KAFKA_PASSWORD="wrong-" + values["XDC_B_KAFKA_PASSWORD"][::-1])
    bad = subprocess.run([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file), "--dc", "B", "-v",
                          "mirror", "run", "--once"], cwd=ROOT, env=wrong, capture_output=True, text=True, timeout=60)
    err_line = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and err_line.startswith("xdc: error: Kafka broker 127.0.0.1:"), bad.stderr[-2000:]
    assert "SASL PLAIN authentication" in err_line and "XDC_B_KAFKA_PASSWORD" in err_line, err_line
    assert wrong["XDC_B_KAFKA_PASSWORD"] not in bad.stdout + bad.stderr
    runs.append(bad)
    # in process, kafka-python at DEBUG: producer, consumer group, admin over SASL_SSL
    # the kafka logger's own level too: an in-process `xdc` run elsewhere in the session quiets it
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="kafka"):
        for dc in ("A", "B"):
            produce(secure_cfg, dc, secure_cfg.dc(dc).kafka.topics.events, [(b"k", b"v")])
            assert len(read_topic(secure_cfg, dc, secure_cfg.dc(dc).kafka.topics.events)) >= 1
    assert any("SASL" in r.getMessage() for r in caplog.records)
    texts = {"caplog": "\n".join(r.getMessage() for r in caplog.records)}
    for i, r in enumerate(runs):
        texts[f"run{i}.stdout"], texts[f"run{i}.stderr"] = r.stdout, r.stderr
    texts[str(cfg_file)] = cfg_file.read_text()
    run_dir = secure_stack.run
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.name not in (SECRETS_FILE, "server.properties")
             and p.suffix in (".log", ".yaml", ".json", ".env", ".txt", ".properties", ".pem")]
    assert any(p.name.startswith("broker-") and p.suffix == ".log" for p in files)
    for p in files:
        texts[str(p)] = p.read_text(errors="replace")
    for where, text in texts.items():
        for name, value in values.items():
            assert value not in text, f"{name} leaked into {where}"
    # where they do live: secrets.env, and a PLAIN broker's own user list (JAAS), readable by its owner only
    assert values["XDC_B_KAFKA_PASSWORD"] in (run_dir / SECRETS_FILE).read_text()
    props = run_dir / "B" / "kafka" / "server.properties"
    assert props.stat().st_mode & 0o077 == 0
    assert values["XDC_A_KAFKA_PASSWORD"] not in (run_dir / "A" / "kafka" / "server.properties").read_text()  # SCRAM
