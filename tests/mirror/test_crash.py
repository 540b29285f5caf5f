"""Crash safety: the mirror as a real `xdc mirror run --follow` process, SIGKILLed at random moments
while events flow, restarted each time, then drained with --once. Afterwards the target equals the
source exactly, no key+sequencer was applied twice, and committed offsets never ran ahead of the
catalog (checked after every kill, when the process can no longer fix anything)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.mirror.chaos_support import (
    Workload,
    applied_events,
    child_env,
    committed_offsets,
    compare_data,
    compare_metadata,
    write_config,
)
from tests.support import read_topic, site
from xdc.config import XdcConfig

pytestmark = pytest.mark.both_backends

ROOT = Path(__file__).resolve().parents[2]
# short session: a killed member leaves the group fast, so the restarted one is assigned quickly
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


def _spawn(cfg_file: Path, mode: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file), "--dc", "B",
                                 "mirror", "run", mode], cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _offsets_not_ahead(cfg: XdcConfig, group: str) -> int:
    done = site(cfg, "B").state.catalog.offsets(group)
    committed = committed_offsets(cfg, "A", group)
    for tp, off in committed.items():
        assert off <= done.get(tp, 0), f"committed {tp}={off} ahead of the catalog's {done.get(tp)}"
    return sum(committed.values())


def _progress(cfg: XdcConfig, group: str) -> int:
    return sum(site(cfg, "B").state.catalog.offsets(group).values())


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_applies_once(
        xcfg: XdcConfig, tag: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    stress = request.config.getoption("--stress")
    kills = 20 if stress else 5
    rng = random.Random(int(os.environ.get("XDC_CRASH_SEED", "0")) or None)
    dcs = {dc: {"kafka": FAST_GROUP} for dc in xcfg.datacenters}
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml", {
        "datacenters": dcs, "mirror": {"batch_max_records": 25, "batch_max_seconds": 0.2, "max_attempts": 8}})
    group = f"{xcfg.mirror.group_id}.B"
    log = tmp_path / "mirror.log"

    work = Workload(xcfg, tag, seed=rng.randrange(2**32))
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            while not stop.is_set():
                work.step()
                if work.published % 10 == 0:
                    work.flush()
                time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            work.close()

    producer = threading.Thread(target=produce, name="workload")
    producer.start()
    survived = 0
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(kills):
            before = _progress(xcfg, group)
            proc = _spawn(cfg_file, "--follow", log)
            deadline = time.monotonic() + 30
            while _progress(xcfg, group) == before and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)  # kill while it is applying, not while it starts
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(rng.uniform(0.0, 0.8))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            survived += 1
            _offsets_not_ahead(xcfg, group)
        stop.set()
        producer.join(timeout=60)
        assert not errors, errors
        # drain: one process, --once, as an operator would after an outage
        proc = _spawn(cfg_file, "--once", log)
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        producer.join(timeout=60)

    data, meta = compare_data(xcfg, tag), compare_metadata(xcfg, tag)
    committed = _offsets_not_ahead(xcfg, group)
    report: dict[str, Any] = {"kills": survived, "events": work.published, "deletes": work.deletes,
                              "data_objects": data.matched, "metadata_objects": meta.matched,
                              "lost": len(data.missing) + len(meta.missing),
                              "diverged": len(data.differ) + len(meta.differ) + len(data.extra) + len(meta.extra),
                              "committed": committed}
    assert data.ok and meta.ok, (data, meta)

    # applied once: every key+sequencer has exactly one applied_time, on the topic and in the catalog
    applied = applied_events(read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.applied, timeout_s=10))
    times: dict[tuple[str, str], set[float]] = {}
    for a in applied:
        times.setdefault((a.key, a.sequencer), set()).add(a.applied_time)
    twice = {k: v for k, v in times.items() if len(v) > 1}
    report["applied_messages"] = len(applied)
    report["resent_by_outbox"] = len(applied) - len(times)
    report["applied_twice"] = len(twice)
    print("\nCRASH REPORT " + json.dumps(report, sort_keys=True))
    assert not twice, twice
    cat = site(xcfg, "B").state.catalog
    rows = [e for e in cat.live_objects() if f"/{tag}/" in e.key]
    for e in rows:
        assert times.get((e.key, e.sequencer)) == {e.applied_time}, e
    assert cat.outbox_size() == 0
