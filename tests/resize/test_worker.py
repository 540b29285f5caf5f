"""The resize worker on the real local stack: frames land in IDC-A, derivatives appear in IDC-A,
the mirror carries them to IDC-B; bad files are quarantined while the rest completes."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from devtools.samples import make_frame
from mirror.ingest import ingest
from mirror.runner import Mirror
from resize.sandbox import CRASH_ENV
from resize.worker import ResizeWorker
from tests.support import read_topic, site, topo
from xdc.config import XdcConfig
from xdc.metrics import Metrics, new_registry

pytestmark = pytest.mark.both_backends

SRC, DST = "idca-drive", "idcb-drive"


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A tiny PNG whose header claims 20000x20000 pixels."""
    import struct
    import zlib
    good = _png(8, 8)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return good[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + good[33:]


def _worker(cfg: XdcConfig) -> ResizeWorker:
    return ResizeWorker(topo(cfg, "A"), metrics=Metrics(new_registry()))


def test_frames_resized_mirrored_and_bad_files_quarantined(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    frames = tmp_path / "in"
    frames.mkdir()
    good = {f"g{i}.jpg": make_frame(i, 1920, 1080) for i in range(3)}
    good["tall.jpg"] = make_frame(9, 1080, 1920)
    for name, data in good.items():
        (frames / name).write_bytes(data)
    jpeg = make_frame(5, 1920, 1080)
    bad = {"corrupt.jpg": jpeg[:600] + b"\x00" * 3000 + jpeg[3600:], "truncated.png": _png(1600, 900)[:200],
           "empty.jpg": b"", "bomb.png": _bomb(), "notes.jpg": b"this is not an image"}
    for name, data in bad.items():
        (frames / name).write_bytes(data)
    (frames / "small.jpg").write_bytes(make_frame(7, 640, 360))
    raw = f"camera/raw/{tag}/"
    ingest(site(xcfg, "A"), frames, SRC, raw)

    with _worker(xcfg) as w:
        stats = w.run(once=True)
    assert stats.results.get("resized") == 4
    assert stats.results.get("quarantined") == len(bad)
    assert stats.results.get("skipped") == 1

    a = site(xcfg, "A").store
    derived = f"camera/720p/{tag}/"
    sizes = {o.key.rsplit("/", 1)[1]: o.size for o in a.list(SRC, derived)}
    assert set(sizes) == set(good)
    for name in good:
        data = a.get(SRC, derived + name)
        im = Image.open(io.BytesIO(data))
        assert im.size == ((1280, 720) if name != "tall.jpg" else (405, 720))
        assert a.head(SRC, derived + name).metadata["xdc-source-etag"] == a.head(SRC, raw + name).etag

    incidents = site(xcfg, "A").state.incidents
    quarantined = {r["key"].rsplit("/", 1)[1]: r["reason"] for r in incidents.recent("quarantine", 100)}
    assert quarantined == {"corrupt.jpg": "corrupt", "truncated.png": "truncated", "empty.jpg": "empty",
                           "bomb.png": "decompression_bomb", "notes.jpg": "not_an_image"}
    letters = read_topic(xcfg, "A", xcfg.dc("A").kafka.topics.dead_letter)
    assert len(letters) == len(bad)

    # the derivatives are put events like any object: the mirror carries them to IDC-B
    with Mirror(topo(xcfg, "B"), metrics=Metrics(new_registry())) as m:
        m.run(once=True)
    b = site(xcfg, "B", seen_from="B").store
    for name in good:
        assert b.get(DST, derived + name) == a.get(SRC, derived + name)


def test_replay_writes_nothing(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    (tmp_path / "f.jpg").write_bytes(make_frame(1, 1920, 1080))
    ingest(site(xcfg, "A"), tmp_path, SRC, f"camera/raw/{tag}/")
    with _worker(xcfg) as w:
        assert w.run(once=True).results == {"resized": 1}
    a = site(xcfg, "A").store
    first = a.head(SRC, f"camera/720p/{tag}/f.jpg")
    # replay the same events from the start with a new group: nothing is rewritten
    with ResizeWorker(topo(xcfg, "A"), metrics=Metrics(new_registry()), group_id=f"{tag}-replay") as w:
        assert w.run(once=True).results == {"done_before": 1}
    again = a.head(SRC, f"camera/720p/{tag}/f.jpg")
    assert again.last_modified == first.last_modified and again.etag == first.etag


def test_a_crashing_frame_is_the_one_quarantined(xcfg: XdcConfig, tmp_path: Path, tag: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A real SIGSEGV in the child on one chosen frame (armed for tests only): that frame, and only
    # that one, is quarantined with the signal named; the rest of the batch comes out, and the
    # children go on serving (the crashed one replaced).
    monkeypatch.setenv(CRASH_ENV, f"{tag}-segv")
    names = [f"f{i}.jpg" for i in range(6)]
    names[1] = f"{tag}-segv.jpg"  # early, so other frames are still queued and in flight
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(make_frame(i, 1920, 1080))
    raw = f"camera/raw/{tag}/"
    ingest(site(xcfg, "A"), tmp_path, SRC, raw)

    with _worker(xcfg) as w:
        stats = w.run(once=True)
    assert stats.results == {"resized": 5, "quarantined": 1}
    a = site(xcfg, "A").store
    derived = f"camera/720p/{tag}/"
    assert {o.key.rsplit("/", 1)[1] for o in a.list(SRC, derived)} == set(names) - {f"{tag}-segv.jpg"}
    rows = site(xcfg, "A").state.incidents.recent("quarantine", 100)
    assert [(r["key"], r["reason"]) for r in rows] == [(raw + f"{tag}-segv.jpg", "worker_crashed")]
    assert rows[0]["detail"] == f"SIGSEGV while resizing {SRC}/{raw}{tag}-segv.jpg"
    letters = read_topic(xcfg, "A", xcfg.dc("A").kafka.topics.dead_letter)
    assert len(letters) == 1
    headers = {k: v.decode() for k, v in letters[0].headers}
    assert headers["xdc-reason"] == "resize_worker_crashed" and "SIGSEGV" in headers["xdc-detail"]
