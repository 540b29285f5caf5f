"""A dataset release on Kafka starts a prewarm in each datacenter it names (`xdc prewarm follow`),
on each cache backend: the JuiceFS stack and the Alluxio stack (tests/conftest.py `cache_backend`)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from cache_client.prewarm.pipeline import Request, check_list
from cache_client.prewarm.release import follow_releases, publish_release
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.support import site, topo
from xdc.config import XdcConfig
from xdc.events import ReleaseEvent
from xdc.metrics import Metrics, new_registry

SRC = "idca-drive"
pytestmark = pytest.mark.both_backends


def test_release_event_prewarms_every_named_datacenter(cache_xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    xcfg = cache_xcfg
    files = tmp_path / "files"
    files.mkdir()
    for i in range(4):
        (files / f"{i}.bin").write_bytes(bytes([i]) * 300_000)
    ingest(site(xcfg, "A"), files, SRC, f"camera/{tag}/")
    with Mirror(topo(xcfg, "B"), metrics=Metrics(new_registry())) as m:
        assert m.run(once=True).applied == 4
    manifest = tmp_path / "release.txt"
    manifest.write_text("".join(f"{SRC}/camera/{tag}/{i}.bin\n" for i in range(4)) + "\n" + f"{SRC}/camera/{tag}/0.bin\n")
    publish_release(site(xcfg, "A"), ReleaseEvent(f"ds-{tag}", "v1", str(manifest), time.time(), ("A", "B")))

    for dc in ("A", "B"):
        reports = follow_releases(topo(xcfg, dc), once=True)
        assert [r.dataset for r in reports] == [f"ds-{tag}"]
        assert reports[0].complete
        check = check_list(site(xcfg, dc), Request(str(manifest)))
        assert check.cached_ratio == 1.0 and check.counts.get("cached") == 4
    # a datacenter the release does not name does nothing
    publish_release(site(xcfg, "A"), ReleaseEvent(f"other-{tag}", "v1", str(manifest), time.time(), ("A",)))
    assert follow_releases(topo(xcfg, "B"), once=True) == []
