"""Crash safety of the resize worker: a real `xdc resize run --follow` process killed (SIGKILL) at
each of its named crash points (xdc/faults.py: the process kills itself there, so the kill lands
exactly in that window), the window checked as the store and the broker show it right after the
kill, then restarted with --once and the outcome checked against independent sources.

The worker's store is the test's notifying proxy with `notifications: false` in the worker's
config: the worker announces each derivative itself (a reconcile event, what the after_upload
window is about), and the proxy, which the worker does not know about, puts one S3 event on the
topic for every write that reached the store: the witness that no derivative was written twice.

The design allows a derivative's event to be published more than once (a replayed batch finds the
derivative done and announces it again; the mirror applies by ETag) but never a second write of an
object: both are asserted exactly. The N of `XDC_CRASH_AT=point:N` comes from a printed seed
(XDC_CRASH_SEED=<seed> replays it)."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from devtools.samples import make_frame
from mirror.ingest import ingest
from tests.mirror.chaos_support import committed_offsets, crash_seed, spawn_xdc, write_config
from tests.support import read_topic, site
from xdc.config import XdcConfig
from xdc.events import ObjectEvent, parse_message
from xdc.io.kafka import Record

pytestmark = [pytest.mark.both_backends(postgres="stress"), pytest.mark.slow]

BUCKET = "idca-drive"
FRAMES = 3  # the fewest that leave frames on both sides of an after_upload kill
# Every named point of the worker's path, in the order a batch passes them (xdc/faults.py).
RESIZE_POINTS = ("resize.after_upload", "resize.after_publish", "resize.before_commit")


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def _wait_killed(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The worker's exit code; afterwards none of its resize children is left running (they see the
    parent's pipe close and exit: a child left over would go on writing after the kill)."""
    try:
        rc = proc.wait(timeout=timeout)
        deadline = time.monotonic() + 30
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_members(proc.pid), f"resize children outlived the killed worker: {_group_members(proc.pid)}"
        return rc
    finally:
        if proc.poll() is None or _group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _derivative_events(records: list[Record], derived: str) -> tuple[dict[str, list[ObjectEvent]], dict[str, list[ObjectEvent]]]:
    """Put events of derivatives, by key: (written, as the store's proxy saw each write;
    announced, as the worker published them)."""
    written: dict[str, list[ObjectEvent]] = {}
    announced: dict[str, list[ObjectEvent]] = {}
    for r in records:
        for ev in parse_message(r.value):
            if isinstance(ev, ObjectEvent) and ev.op == "put" and ev.key.startswith(derived):
                name = ev.key.removeprefix(derived)
                (announced if ev.reconcile else written).setdefault(name, []).append(ev)
    return written, announced


def _behind(cfg: XdcConfig, group: str, frames: list[Record]) -> list[Record]:
    """The frames' records at or past the group's committed offset: not yet acknowledged."""
    done = committed_offsets(cfg, "A", group)
    return [r for r in frames if r.offset >= done.get((r.topic, r.partition), 0)]


@pytest.mark.parametrize("point", RESIZE_POINTS)
def test_sigkill_at_each_named_crash_point(point: str, xcfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    """Killed at `point`: the window shows right after the kill; a restart then leaves exactly one
    derivative per frame (none written twice), each announced at least once, the bad frame (and only
    it) quarantined, and the offsets committed past every frame."""
    rng = random.Random(crash_seed())
    nth = rng.randint(1, FRAMES) if point == "resize.after_upload" else 1  # batch points: the frames' batch
    frames = tmp_path / "in"
    frames.mkdir()
    good = [f"f{i}.jpg" for i in range(FRAMES)]
    for i, name in enumerate(good):
        (frames / name).write_bytes(make_frame(i, 1920, 1080))
    (frames / "bad.jpg").write_bytes(b"this is not an image")
    raw, derived = f"camera/raw/{tag}/", f"camera/720p/{tag}/"
    ingest(site(xcfg, "A"), frames, BUCKET, raw)
    topic = xcfg.dc("A").kafka.topics.events
    frame_recs = read_topic(xcfg, "A", topic)
    assert len(frame_recs) == FRAMES + 1
    group = site(xcfg, "A").group("resize")
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml", {
        "datacenters": {"A": {"s3": {"notifications": False}}}, "resize": {"workers": 1}})
    log = tmp_path / "resize.log"

    rc = _wait_killed(spawn_xdc(cfg_file, "A", ["resize", "run", "--follow"], log, crash_at=f"{point}:{nth}"),
                      timeout=180)
    text = log.read_text(errors="replace")
    assert rc == -signal.SIGKILL and f"crash point {point} reached (hit {nth})" in text, (rc, text[-3000:])

    # -- the window, as the store and the broker show it now ---------------------------------------
    a = site(xcfg, "A").store
    at_kill = {o.key.removeprefix(derived): o for o in a.list(BUCKET, derived)}
    written, announced = _derivative_events(read_topic(xcfg, "A", topic), derived)
    behind = _behind(xcfg, group, frame_recs)
    assert behind, "the group committed every frame before the kill"
    assert set(written) == set(at_kill) and all(len(v) == 1 for v in written.values()), (written, at_kill)
    if point == "resize.after_upload":
        # the nth derivative is in the store, its event not sent: at least one derivative unannounced
        assert len(at_kill) >= nth and set(at_kill) - set(announced), (sorted(at_kill), sorted(announced))
    else:
        # the batch's events all flushed, its offsets not committed
        assert at_kill and set(announced) == set(at_kill), (sorted(at_kill), sorted(announced))
    announced_at_kill = sorted(set(announced) & set(at_kill))
    letters_at_kill = len(read_topic(xcfg, "A", xcfg.dc("A").kafka.topics.dead_letter))

    # -- restart, drain, verify against the store, the topic and Pillow ----------------------------
    proc = spawn_xdc(cfg_file, "A", ["resize", "run", "--once"], log)
    assert _wait_killed(proc, timeout=180) == 0, log.read_text(errors="replace")[-3000:]
    after = {o.key.removeprefix(derived): o for o in a.list(BUCKET, derived)}
    assert set(after) == set(good), sorted(after)
    for name in good:
        im = Image.open(io.BytesIO(a.get(BUCKET, derived + name)))
        assert im.size == (1280, 720), (name, im.size)
        assert a.head(BUCKET, derived + name).metadata["xdc-source-etag"] == a.head(BUCKET, raw + name).etag
    for name, o in at_kill.items():  # what the killed run wrote, the replay left alone
        assert (after[name].etag, after[name].size) == (o.etag, o.size), name
    written, announced = _derivative_events(read_topic(xcfg, "A", topic), derived)
    assert {n: len(v) for n, v in written.items()} == {n: 1 for n in good}, written  # one write per derivative
    assert set(announced) == set(good), sorted(announced)  # at least once each
    for name, evs in announced.items():
        assert {e.etag for e in evs} == {after[name].etag}, (name, evs)
    rows = site(xcfg, "A").state.incidents.recent("quarantine", 100)
    assert {r["key"] for r in rows} == {raw + "bad.jpg"}, rows
    letters = read_topic(xcfg, "A", xcfg.dc("A").kafka.topics.dead_letter)
    assert 1 <= len(letters) <= 2, letters  # the bad frame, once per run that handled its batch
    assert not _behind(xcfg, group, frame_recs)
    report: dict[str, Any] = {
        "point": point, "hit": nth, "derivatives_at_kill": len(at_kill),
        "announced_at_kill": len(announced_at_kill),
        "events_per_derivative": {n: len(v) for n, v in sorted(announced.items())},
        "dead_letters": {"at_kill": letters_at_kill, "after": len(letters)}}
    print("RESIZE CRASH POINT REPORT " + json.dumps(report, sort_keys=True))

