"""Crash safety of the release follower: a real `xdc prewarm follow` process killed (SIGKILL) at each
of its named crash points (xdc/faults.py), the window checked right after the kill (the cache, seen
through the nodes' real mounts; the ledger; the group's committed offset), then restarted with
--once: the dataset ends warm, the ledger holds one outcome for the release, and the release's
offset is committed only after that outcome.

releases.after_warm: warm, no outcome in the ledger -> the restart warms again (cheap: the files are
cached) and records it. releases.before_commit: outcome in the ledger, offset not committed -> the
restart finds the outcome and does not warm again. In both, `dataset.ready` goes out exactly once:
it is queued in the state's outbox when the version becomes ready (pipeline.record_readiness) and
flushed before the kill; the second warm finds the version ready already and queues nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cache_client.prewarm.pipeline import Request, check_list
from cache_client.prewarm.release import publish_release
from tests.cache_client.test_release import _list, _mirrored_files, _ready
from tests.mirror.chaos_support import committed_offsets, spawn_xdc, write_config
from tests.support import read_topic, site
from xdc.config import XdcConfig
from xdc.events import ReleaseEvent

pytestmark = [pytest.mark.both_backends(postgres="stress"), pytest.mark.slow]

RELEASE_POINTS = ("releases.after_warm", "releases.before_commit")


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.parametrize("point", RELEASE_POINTS)
def test_sigkill_at_each_named_crash_point(point: str, xcfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    keys = _mirrored_files(xcfg, tmp_path, tag, n=3)
    manifest = str(_list(tmp_path, keys))
    dataset = f"ds-{tag}"
    b = site(xcfg, "B")
    topic = xcfg.dc("B").kafka.topics.releases
    assert check_list(b, Request(manifest)).cached_ratio == 0.0  # cold before: the warm is the follower's
    publish_release(b, ReleaseEvent(dataset, "v1", manifest, time.time(), ("B",)))
    (rec,) = read_topic(xcfg, "B", topic)
    tp = (topic, rec.partition)
    group = b.group("prewarm")
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml")
    log = tmp_path / "follow.log"

    rc = _wait(spawn_xdc(cfg_file, "B", ["prewarm", "follow"], log, crash_at=point), timeout=180)
    text = log.read_text(errors="replace")
    assert rc == -signal.SIGKILL and f"crash point {point} reached (hit 1)" in text, (rc, text[-3000:])

    # -- the window: warm in the cache, the offset not committed; the ledger with or without the outcome
    assert check_list(b, Request(manifest)).cached_ratio == 1.0
    assert committed_offsets(xcfg, "B", group).get(tp, 0) <= rec.offset
    entry = b.state.releases.get(dataset, "v1")
    assert entry is not None and entry.attempts == 1, entry
    if point == "releases.after_warm":
        assert not entry.has_result and entry.state == "pending", entry
    else:
        assert (entry.state, entry.has_result) == ("warm", True), entry

    # -- restart, drain: one outcome, warm, the offset past the release only now -------------------
    rc = _wait(spawn_xdc(cfg_file, "B", ["prewarm", "follow", "--once"], log), timeout=180)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    entries = [e for e in b.state.releases.entries() if e.dataset == dataset]
    assert [(e.version, e.state) for e in entries] == [("v1", "warm")], entries
    # after_warm: warmed again (no outcome was recorded); before_commit: the outcome found, no second warm
    assert entries[0].attempts == (2 if point == "releases.after_warm" else 1), entries[0]
    assert check_list(b, Request(manifest)).cached_ratio == 1.0
    assert committed_offsets(xcfg, "B", group).get(tp, 0) > rec.offset
    ready = _ready(read_topic(xcfg, "B", topic), dataset)
    assert len(ready) == 1, ready
    assert read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.dead_letter) == []
    print("RELEASE CRASH POINT REPORT " + json.dumps(
        {"point": point, "attempts": entries[0].attempts, "ready_events": len(ready)}, sort_keys=True))
