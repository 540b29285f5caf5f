"""Mirror replicas on PostgreSQL state: two `xdc mirror run --follow` processes share the source
partitions (one consumer group) while events flow; one is killed with SIGKILL mid-batch (from outside
at a random moment, or by itself at a named crash point); the survivor takes its partitions over and
converges by itself (no new process, no drain). Then the target equals the source, every applied
event was published exactly once, and the committed offsets were never ahead of the state.

And a second process on a SQLite state is refused with a clear message (mirror and resize)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from devtools.procs import stop_groups
from tests.conftest import isolated
from tests.mirror.chaos_support import (
    Workload,
    applied_events,
    child_env,
    committed_offsets,
    compare_data,
    compare_metadata,
    write_config,
)
from tests.support import end_offsets, read_topic, site
from xdc.config import XdcConfig

ROOT = Path(__file__).resolve().parents[2]
# short sessions: the survivor gets the dead replica's partitions about 2 s after the kill
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


def _spawn(cfg_file: Path, log: Path, dc: str, *argv: str, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    """`xdc --config FILE --dc DC ARGV...` in a session of its own, output into `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file), "--dc", dc, *argv],
                                cwd=ROOT, env={**child_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _assigned(log: Path) -> set[int] | None:
    """The partitions of the replica's last assignment (None before its first)."""
    got = re.findall(r": assigned (.*) of A$", log.read_text(errors="replace"), re.M)
    return {int(p) for p in re.findall(r"\[(\d+)\]", got[-1])} if got else None


def _committed_not_ahead(cfg: XdcConfig, group: str) -> dict[tuple[str, int], int]:
    """Kafka's committed offsets first, the state's after: a replica that goes on applying moves
    both, the state first, so this order compares a commit with a state at least as new."""
    committed = committed_offsets(cfg, "A", group)
    done = site(cfg, "B").state.catalog.offsets(group)
    for tp, off in committed.items():
        assert off <= done.get(tp, 0), f"committed {tp}={off} ahead of the state's {done.get(tp)}"
    return committed


def _wait(what: str, cond: Any, timeout_s: float, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}" for log in logs)
            pytest.fail(f"{what}: not within {timeout_s:.0f}s\n{tails}")
        for p, log in zip(procs, logs, strict=False):
            if p.poll() is not None and p.returncode != -signal.SIGKILL:
                pytest.fail(f"{log.name} exited with {p.returncode}:\n{log.read_text(errors='replace')[-2500:]}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["sigkill_while_applying", "mirror.after_state_commit", "mirror.in_outbox_flush"])
def test_two_replicas_one_killed_mid_batch(stack_cfg: XdcConfig, pg_port: int, tag: str, tmp_path: Path,
                                           kill: str) -> None:
    cfg = isolated(stack_cfg, tag, pg_port=pg_port)
    seed = int(os.environ.get("XDC_REPLICA_SEED", "0")) or random.randrange(2**32)
    print(f"\nseed {seed} (XDC_REPLICA_SEED={seed} repeats this schedule)")
    rng = random.Random(seed)
    cfg_file = write_config(cfg, tmp_path / "xdc.yaml", {
        "datacenters": {dc: {"kafka": FAST_GROUP} for dc in cfg.datacenters},
        "mirror": {"batch_max_records": 20, "batch_max_seconds": 0.2, "max_attempts": 8}})
    group = f"{cfg.mirror.group_id}.B"
    topic = cfg.dc("A").kafka.topics.events
    cat = site(cfg, "B").state.catalog
    logs = [tmp_path / "survivor.log", tmp_path / "victim.log"]

    work = Workload(cfg, tag, seed=rng.randrange(2**32))
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:  # a steady load: about 40 events/s, data and metadata routes, deletes
        try:
            while not stop.is_set():
                work.step()
                if work.published % 5 == 0:
                    work.flush()
                time.sleep(0.025)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            work.close()

    producer = threading.Thread(target=produce, name="workload")
    procs: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {"kill": kill}
    try:
        producer.start()
        crash = {} if kill.startswith("sigkill") else {"XDC_CRASH_AT": f"{kill}:{rng.randint(4, 8)}"}
        procs.append(_spawn(cfg_file, logs[0], "B", "mirror", "run", "--follow"))
        _wait("the first replica applies", lambda: sum(cat.offsets(group).values()) > 0, 60, procs, logs[:1])
        procs.append(_spawn(cfg_file, logs[1], "B", "mirror", "run", "--follow", env=crash))
        owners = lambda: [_assigned(log) for log in logs]  # noqa: E731
        _wait("the partitions are shared by both replicas",
              lambda: all(owners()) and not owners()[0] & owners()[1] and len(owners()[0] | owners()[1]) == 4,  # type: ignore[operator]
              60, procs, logs)
        report["victim_owned"] = sorted(owners()[1] or ())
        victim = procs[1]
        if crash:  # it kills itself at the crash point, in the middle of one of its batches
            _wait(f"the victim reaches {crash['XDC_CRASH_AT']}", lambda: victim.poll() is not None, 90, procs, logs)
        else:
            before = sum(cat.offsets(group).values())
            _wait("both replicas apply", lambda: sum(cat.offsets(group).values()) > before + 20, 60, procs, logs)
            time.sleep(rng.uniform(0.0, 0.5))
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
        assert victim.returncode == -signal.SIGKILL, logs[1].read_text()[-2500:]
        report["killed_after_events"] = work.published
        _committed_not_ahead(cfg, group)  # at the moment of the fault
        _wait("the survivor takes every partition", lambda: _assigned(logs[0]) == {0, 1, 2, 3}, 60, procs[:1],
              logs[:1])
        time.sleep(3)  # the load goes on while the survivor owns everything
        stop.set()
        producer.join(60)
        assert not errors, errors
        ends = end_offsets(cfg, "A", topic)
        # the survivor converges by itself: every event applied into the state, every applied event out
        _wait("the survivor applies every event", lambda: cat.offsets(group) == ends and cat.outbox_size() == 0,
              120, procs[:1], logs[:1])
        committed = _committed_not_ahead(cfg, group)
        _wait("the survivor commits its offsets", lambda: _committed_not_ahead(cfg, group) == ends, 30, procs[:1],
              logs[:1])
        report["committed"] = sum(committed.values())
    finally:
        stop.set()
        producer.join(60)
        stop_groups(procs)

    data, meta = compare_data(cfg, tag), compare_metadata(cfg, tag)
    report |= {"events": work.published, "deletes": work.deletes, "data_objects": data.matched,
               "metadata_objects": meta.matched}
    assert data.ok and meta.ok, (data, meta)

    # every applied event exactly once on the applied topic (the outbox never sends a row twice),
    # and each catalog row announced with the applied time the catalog holds
    applied = applied_events(read_topic(cfg, "B", cfg.dc("B").kafka.topics.applied, timeout_s=20))
    seen = Counter((a.key, a.sequencer) for a in applied)
    twice = {k: n for k, n in seen.items() if n > 1}
    report |= {"applied_messages": len(applied), "published_twice": len(twice)}
    print("REPLICA REPORT " + json.dumps(report, sort_keys=True))
    assert not twice, twice
    if kill == "mirror.in_outbox_flush":  # the victim died between sending and deleting: the survivor found its sends
        assert "marked rows were sent by a publisher that stopped" in logs[0].read_text()
    times = {(a.key, a.sequencer): a.applied_time for a in applied}
    rows = [e for e in cat.live_objects() if f"/{tag}/" in e.key]
    assert rows
    for e in rows:
        assert times.get((e.key, e.sequencer)) == e.applied_time, e
    # per key, the applied events are in sequencer order (the outbox keeps each source partition's order)
    by_key: dict[str, list[str]] = {}
    for a in applied:
        by_key.setdefault(a.key, []).append(a.sequencer)
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), (key, seqs)


@pytest.mark.parametrize("role", ["mirror", "resize"])
def test_a_second_process_on_sqlite_state_is_refused(xcfg: XdcConfig, tmp_path: Path, role: str) -> None:
    dc = "B" if role == "mirror" else "A"  # the resize worker works in the datacenter where frames land
    assert xcfg.dc(dc).state_url.startswith("sqlite:///")
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml", {"metrics": {"port": 0}})
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = _spawn(cfg_file, logs[0], dc, role, "run", "--follow")
    try:
        lock = Path(site(xcfg, dc).state_location + f".{role}.lock")
        _wait("the first process holds the lease", lambda: lock.exists() and f"pid {first.pid} " in lock.read_text(),
              60, [first], logs[:1])
        second = _spawn(cfg_file, logs[1], dc, role, "run", "--once")
        assert second.wait(60) == 2
        out = logs[1].read_text()
        assert f"xdc: error: another {role} process already runs on the SQLite state" in out, out
        assert f"(pid {first.pid} on " in out and "use a postgresql:// state_url" in out, out
        assert first.poll() is None  # the first one goes on
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.wait(30)
