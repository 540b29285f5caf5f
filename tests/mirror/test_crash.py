"""Crash safety: the mirror as a real `xdc mirror run` process, killed (SIGKILL) at each named crash
point (xdc/faults.py: the process kills itself there, so the kill lands exactly in that window) and
at random moments while events flow, restarted each time, then drained with --once. Afterwards the
target equals the source exactly, no key+sequencer was applied twice, and committed offsets never
ran ahead of the state (checked after every kill, when the process can no longer fix anything).
Every random schedule prints its seed: XDC_CRASH_SEED=<seed> replays it."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.mirror.chaos_support import (
    Workload,
    applied_events,
    committed_offsets,
    compare_data,
    compare_metadata,
    crash_seed,
    spawn_xdc,
    write_config,
)
from tests.support import read_topic, site
from xdc.config import XdcConfig

pytestmark = pytest.mark.both_backends(postgres="stress")

# short session: a killed member leaves the group fast, so the restarted one is assigned quickly
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


# Every named point of the mirror's path (xdc/faults.py), in the order a batch passes them.
MIRROR_POINTS = ("mirror.after_copy", "mirror.after_state_commit", "mirror.in_outbox_flush",
                 "mirror.after_applied_publish", "mirror.before_commit")


def _offsets_not_ahead(cfg: XdcConfig, group: str) -> int:
    done = site(cfg, "B").state.catalog.offsets(group)
    committed = committed_offsets(cfg, "A", group)
    for tp, off in committed.items():
        assert off <= done.get(tp, 0), f"committed {tp}={off} ahead of the catalog's {done.get(tp)}"
    return sum(committed.values())


def _progress(cfg: XdcConfig, group: str) -> int:
    return sum(site(cfg, "B").state.catalog.offsets(group).values())


def _verify(xcfg: XdcConfig, tag: str, group: str) -> dict[str, Any]:
    """Source == target (data by listing + MD5, metadata by the catalog), every key+sequencer applied
    once (one applied_time on the applied topic and in the catalog), the outbox empty, committed
    offsets not ahead of the state. Returns the figures."""
    data, meta = compare_data(xcfg, tag), compare_metadata(xcfg, tag)
    committed = _offsets_not_ahead(xcfg, group)
    report: dict[str, Any] = {"data_objects": data.matched, "metadata_objects": meta.matched,
                              "lost": len(data.missing) + len(meta.missing),
                              "diverged": len(data.differ) + len(meta.differ) + len(data.extra) + len(meta.extra),
                              "committed": committed}
    assert data.ok and meta.ok, (data, meta)
    applied = applied_events(read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.applied, timeout_s=10))
    times: dict[tuple[str, str], set[float]] = {}
    for a in applied:
        times.setdefault((a.key, a.sequencer), set()).add(a.applied_time)
    twice = {k: v for k, v in times.items() if len(v) > 1}
    report["applied_messages"] = len(applied)
    report["resent_by_outbox"] = len(applied) - len(times)
    report["applied_twice"] = len(twice)
    assert not twice, twice
    cat = site(xcfg, "B").state.catalog
    for e in (e for e in cat.live_objects() if f"/{tag}/" in e.key):
        assert times.get((e.key, e.sequencer)) == {e.applied_time}, e
    assert cat.outbox_size() == 0
    return report


@pytest.mark.slow
@pytest.mark.parametrize("point", MIRROR_POINTS)
def test_sigkill_at_each_named_crash_point(point: str, xcfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    """The process kills itself at `point` in its N-th batch (N from the seed). Right after the kill
    the state shows the window it died in; a restart then loses nothing and applies nothing twice."""
    rng = random.Random(crash_seed())
    nth = rng.randint(1, 3)
    # the default 6 s session: the restart comes long after the dead member left, and a 2 s session
    # can expire under load while a fresh process imports its libraries
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml", {"mirror": {"batch_max_records": 10, "batch_max_seconds": 0.2}})
    group = f"{xcfg.mirror.group_id}.B"
    work = Workload(xcfg, tag, seed=rng.randrange(2**32))
    for _ in range(60):
        work.step()
    work.close()
    log = tmp_path / "mirror.log"
    proc = spawn_xdc(cfg_file, "B", ["mirror", "run", "--follow"], log, crash_at=f"{point}:{nth}")
    try:
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log.read_text(errors="replace")
    assert rc == -signal.SIGKILL and f"crash point {point} reached (hit {nth})" in text, (rc, text[-3000:])
    # the window the kill landed in, as the state and the broker show it now
    cat = site(xcfg, "B").state.catalog
    state = sum(cat.offsets(group).values())
    committed = _offsets_not_ahead(xcfg, group)
    if point == "mirror.after_copy":
        # copied, nothing of this batch recorded: redone on restart. The pipelined loop may have the
        # previous batch (10 records at most) durable in the state and its commit still to come.
        assert committed <= state <= committed + 10, (state, committed)
    else:
        assert state > committed, (state, committed)  # durable in the state, not committed in Kafka
    if point in ("mirror.after_state_commit", "mirror.in_outbox_flush"):
        assert cat.outbox_size() > 0  # applied events owed: the restart publishes them
    proc = spawn_xdc(cfg_file, "B", ["mirror", "run", "--once"], log)
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    report = {"point": point, "hit": nth, "events": work.published, "state_ahead_at_kill": state - committed,
              **_verify(xcfg, tag, group)}
    print("CRASH POINT REPORT " + json.dumps(report, sort_keys=True))


@pytest.mark.both_backends  # on PostgreSQL in CI too (the module's other tests: with --stress)
@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_applies_once(
        xcfg: XdcConfig, tag: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """While events flow: each run is killed either at a random moment, or at a named crash point
    in a random batch (chosen by the seed); 5 kills, 20 with --stress."""
    stress = request.config.getoption("--stress")
    kills = 20 if stress else 5
    rng = random.Random(crash_seed())
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
    by_point: dict[str, int] = {}
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(kills):
            point = rng.choice(("random moment", *MIRROR_POINTS))
            nth = rng.randint(1, 4)
            before = _progress(xcfg, group)
            offset = log.stat().st_size if log.exists() else 0
            proc = spawn_xdc(cfg_file, "B", ["mirror", "run", "--follow"], log,
                             crash_at=None if point == "random moment" else f"{point}:{nth}")
            if point == "random moment":
                deadline = time.monotonic() + 30
                while _progress(xcfg, group) == before and time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.05)  # kill while it is applying, not while it starts
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(rng.uniform(0.0, 0.8))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            else:
                try:
                    rc = proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                    raise AssertionError(f"{point}:{nth} was never reached: {log.read_text()[-3000:]}") from None
                tail = log.read_bytes()[offset:].decode(errors="replace")
                assert rc == -signal.SIGKILL and f"crash point {point} reached" in tail, (rc, tail[-3000:])
            by_point[point] = by_point.get(point, 0) + 1
            _offsets_not_ahead(xcfg, group)
        stop.set()
        producer.join(timeout=60)
        assert not errors, errors
        # drain: one process, --once, as an operator would after an outage
        proc = spawn_xdc(cfg_file, "B", ["mirror", "run", "--once"], log)
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        producer.join(timeout=60)

    report: dict[str, Any] = {"kills": sum(by_point.values()), "kills_by_point": by_point,
                              "events": work.published, "deletes": work.deletes, **_verify(xcfg, tag, group)}
    print("\nCRASH REPORT " + json.dumps(report, sort_keys=True))
