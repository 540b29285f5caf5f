"""A dataset release on Kafka starts a prewarm in each datacenter it names (`xdc prewarm follow`)."""
from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest

from cache_client.prewarm.pipeline import Request, check_list
from cache_client.prewarm.release import follow_releases, publish_release
from cache_client.selectors import roots_from_args
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.cache_client.indexes import CAMS, nuscenes_v2_infos, under
from tests.mirror.chaos_support import write_config
from tests.support import read_topic, site, topo
from xdc.app.cli import main as cli_main
from xdc.config import XdcConfig
from xdc.events import ReleaseEvent
from xdc.metrics import Metrics, new_registry

SRC = "idca-drive"
pytestmark = pytest.mark.both_backends


def test_release_event_prewarms_every_named_datacenter(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
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


def _nuscenes_release(xcfg: XdcConfig, tmp_path: Path, tag: str) -> tuple[str, list[str], list[str]]:
    """A nuScenes v2 index (relative file names, numpy inside) and its files, ingested into IDC-A
    under camera/<tag>/ and mirrored into IDC-B. Returns (index URI, --root args, keys in A)."""
    doc, placed = nuscenes_v2_infos(2, sweeps=1)
    data = tmp_path / "data"
    for d, names in placed.items():
        for name in names:
            p = data / "nuscenes" / d / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(name.encode() * 500)
    (data / "idx").mkdir()
    (data / "idx" / "infos_train.pkl").write_bytes(pickle.dumps(doc, protocol=4))
    ingest(site(xcfg, "A"), data, SRC, f"camera/{tag}/")
    with Mirror(topo(xcfg, "B"), metrics=Metrics(new_registry())) as m:
        m.run(once=True)
    roots = [f"s3://{SRC}/camera/{tag}/nuscenes", "pts=samples/LIDAR_TOP", "sweeps=sweeps/LIDAR_TOP",
             *[f"{c}=samples/{c}" for c in CAMS]]
    return f"s3://{SRC}/camera/{tag}/idx/infos_train.pkl", roots, under(f"{SRC}/camera/{tag}/nuscenes", placed)


def test_an_index_with_roots_from_the_cli_and_in_a_release(xcfg: XdcConfig, tmp_path: Path, tag: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`xdc prewarm plan --list s3://.../infos_train.pkl --root ...` in IDC-B (the index is read from
    B's own store, where it was mirrored), then `xdc release` with the same roots: both datacenters
    warm every file; each says `dataset.ready` once on its releases topic, which the follower ignores."""
    index, roots, keys = _nuscenes_release(xcfg, tmp_path, tag)
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml")
    root_args = [a for r in roots for a in ("--root", r)]
    assert cli_main(["--config", str(cfg_file), "--dc", "B", "prewarm", "plan", "--list", index, *root_args]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["list"]["shape"] == "mmdet3d-v2" and plan["list"]["root"]["pts"].endswith("/nuscenes/samples/LIDAR_TOP")
    assert (plan["files"], plan["present_files"], plan["rejected_count"]) == (len(keys), len(keys), 0)
    assert plan["warm_files"] == 2 * len(keys)  # two nodes, replicate

    assert cli_main(["--config", str(cfg_file), "release", "--dataset", f"nusc-{tag}", "--version", "v2",
                     "--manifest", index, "--datacenters", "A", "B", *root_args]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert sent["root"][""] == roots[0] and sent["root"]["CAM_BACK"] == "samples/CAM_BACK" and "select" not in sent
    for dc in ("A", "B"):
        (report,) = follow_releases(topo(xcfg, dc), once=True)
        assert report.complete and len(report.check.files) == len(keys), report.summary()
        assert report.ready_event is not None and report.ready_event.dc == dc
        mapped = check_list(site(xcfg, dc), Request(index, root=roots_from_args(root_args[1::2])))
        assert mapped.cached_ratio == 1.0 and len(mapped.files) == len(keys)
    # the ready events went out on A's and B's releases topics; a follower reading them does nothing
    for dc in ("A", "B"):
        ready = [json.loads(r.value) for r in read_topic(xcfg, dc, xcfg.dc(dc).kafka.topics.releases)]
        assert [(m["type"], m.get("dc")) for m in ready] == ([("dataset.released", None)] if dc == "A" else []) + [
            ("dataset.ready", dc)]
    assert follow_releases(topo(xcfg, "B"), once=True) == []
    assert read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.dead_letter) == []
    assert [(r["dataset"], r["ready"]) for r in site(xcfg, "B").state.prewarm.readiness()] == [(f"nusc-{tag}", True)]
