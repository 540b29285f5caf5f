"""A dataset release on Kafka starts a prewarm in each datacenter it names (`xdc prewarm follow`)."""
from __future__ import annotations

import time
from pathlib import Path

from cache_client.prewarm.pipeline import check_list
from cache_client.prewarm.release import follow_releases, publish_release
from xdc.events import ReleaseEvent
from mirror.ingest import ingest
from mirror.runner import Mirror
from xdc.config import XdcConfig
from xdc.metrics import Metrics, new_registry

SRC = "idca-drive"


def test_release_event_prewarms_every_named_datacenter(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    files = tmp_path / "files"
    files.mkdir()
    for i in range(4):
        (files / f"{i}.bin").write_bytes(bytes([i]) * 300_000)
    ingest(xcfg, "A", files, SRC, f"camera/{tag}/")
    with Mirror(xcfg, "B", metrics=Metrics(new_registry())) as m:
        assert m.run(once=True).applied == 4
    manifest = tmp_path / "release.txt"
    manifest.write_text("".join(f"{SRC}/camera/{tag}/{i}.bin\n" for i in range(4)) + "\n" + f"{SRC}/camera/{tag}/0.bin\n")
    publish_release(xcfg, "A", ReleaseEvent(f"ds-{tag}", "v1", str(manifest), time.time(), ("A", "B")))

    for dc in ("A", "B"):
        reports = follow_releases(xcfg, dc, once=True)
        assert [r.dataset for r in reports] == [f"ds-{tag}"]
        assert reports[0].complete
        check = check_list(xcfg, dc, manifest)
        assert check.cached_ratio == 1.0 and check.counts.get("cached") == 4
    # a datacenter the release does not name does nothing
    publish_release(xcfg, "A", ReleaseEvent(f"other-{tag}", "v1", str(manifest), time.time(), ("A",)))
    assert follow_releases(xcfg, "B", once=True) == []
