"""`xdc config impact` on the local stack: real catalogs, real JuiceFS cache nodes, real S3 listings.

- adding a cache node (shard placement) reports the files that move, and exactly those are then
  warmed onto the new node by a prewarm under the new config (what placement then does);
- narrowing a route's prefix reports the catalogued objects it orphans (and the dataset that loses
  readiness), counted against the keys this test itself put outside the new prefix;
- a bucket collision and an endpoint mistake introduced by the new config are reported (through the
  CLI, which loads a config the loader would refuse).
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cache_client.juicefs import mount_node, umount_node
from cache_client.prewarm.pipeline import Request, run_prewarm, to_cache_file
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.mirror.chaos_support import child_env, config_data
from tests.support import site, topo
from xdc.config import CacheNode, XdcConfig, parse_config
from xdc.metrics import Metrics, new_registry
from xdc.observe.impact import impact

ROOT = Path(__file__).resolve().parents[3]
SRC = "idca-drive"


def cfg_of(data: dict[str, Any], base: XdcConfig) -> XdcConfig:
    return parse_config(copy.deepcopy(data), base_dir=base.base_dir, allow_bucket_collisions=True)


def write_files(root: Path, names: dict[str, int]) -> dict[str, int]:
    for name, size in names.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([len(name) % 251]) * size)
    return names


def mirror_into_b(cfg: XdcConfig) -> int:
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
        return m.run(once=True).applied


@pytest.fixture
def third_node(xcfg: XdcConfig, tmp_path: Path) -> Iterator[CacheNode]:
    """A third cache node of IDC-B's volume, mounted for this test only."""
    cache = xcfg.dc("B").cache
    assert cache is not None
    node = CacheNode(name="b2", mount=tmp_path / "mnt-b2", cache_dir=tmp_path / "cache-b2", cache_size_mib=256)
    mount_node(cache.meta_url, node)
    try:
        yield node
    finally:
        umount_node(node)


def test_adding_a_cache_node_reports_the_files_that_then_move(xcfg: XdcConfig, tmp_path: Path, tag: str,
                                                              third_node: CacheNode) -> None:
    sizes = write_files(tmp_path / "src", {f"{tag}/f{i:02d}.bin": 1000 + 37 * i for i in range(40)})
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, "camera/")
    assert mirror_into_b(xcfg) == 40
    data = config_data(xcfg)
    data["datacenters"]["B"]["cache"]["placement"] = "shard"
    live = cfg_of(data, xcfg)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{SRC}/camera/{k}\n" for k in sizes))
    req = Request(str(listing), f"ds-{tag}", "v1")
    assert run_prewarm(site(live, "B"), req).complete

    new_data = copy.deepcopy(data)
    new_data["datacenters"]["B"]["cache"]["nodes"].append(json.loads(third_node.model_dump_json()))
    new = cfg_of(new_data, xcfg)
    rep = impact(topo(live, "B"), new).to_dict()
    assert rep["routes"] == [] and rep["collisions"] == [] and rep["endpoints"] == []
    (b,) = rep["cache"]
    assert b["dc"] == "B" and b["changes"] == ["nodes added: b2"]
    (ds,) = b["datasets"]
    to_warm = {n: set(v["keys"]) for n, v in ds["to_warm"].items()}
    moved = set().union(*to_warm.values())
    assert "b2" in to_warm and 0 < len(moved) < 40 and ds["moved_files"] == len(moved)
    by_b_key = {f"idcb-drive/camera/{k}": n for k, n in sizes.items()}
    assert ds["moved_bytes"] == sum(by_b_key[k] for k in moved)  # sizes from the files this test wrote
    (ready,) = rep["readiness"]
    assert ready["dc"] == "B" and ready["dataset"] == f"ds-{tag}" and f"{len(moved)} files must be warmed on" \
        in ready["reasons"][0]

    # what placement then does: a prewarm under the new config warms exactly those, where reported
    b_new = site(new, "B")
    files = [to_cache_file(k, "") for k in by_b_key]

    def cached() -> dict[str, set[str]]:
        return {n: {f.bucket_key for f in files if got[f.path] > 0}
                for n in ("b0", "b1", "b2") for got in [b_new.cache.cached_bytes(n, files)]}
    before = cached()
    assert before["b2"] == set()
    report = run_prewarm(b_new, req)
    assert report.complete
    after = cached()
    assert {n: after[n] - before[n] for n in after if after[n] - before[n]} == to_warm
    assert {f.bucket_key for f in report.plan.shares["b2"].files} == to_warm["b2"]


def test_narrowing_a_route_reports_the_objects_it_orphans(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    keep = write_files(tmp_path / "src", {f"{tag}/keep/k{i}.bin": 500 + i for i in range(6)})
    drop = write_files(tmp_path / "src", {f"{tag}/drop/d{i}.bin": 2000 + 10 * i for i in range(4)})
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, "camera/")
    assert mirror_into_b(xcfg) == 10
    b = site(xcfg, "B")
    b.state.prewarm.register(f"ds-{tag}", "v1", [f"idcb-drive/camera/{tag}/drop/d0.bin",
                                                  f"idcb-drive/camera/{tag}/keep/k0.bin"])
    b.state.prewarm.register(f"safe-{tag}", "v1", [f"idcb-drive/camera/{tag}/keep/k1.bin"])
    data = config_data(xcfg)
    new_data = copy.deepcopy(data)
    camera = next(r for r in new_data["routes"] if r["name"] == "camera")
    camera["source"]["prefix"] = camera["target"]["prefix"] = f"camera/{tag}/keep/"
    rep = impact(topo(cfg_of(data, xcfg), "B"), cfg_of(new_data, xcfg)).to_dict()

    assert rep["changed_fields"] == ["routes.camera.source.prefix", "routes.camera.target.prefix"]
    (ch,) = rep["routes"]
    assert ch["route"] == "camera" and ch["change"] == "changed" and ch["fields"] == ["source.prefix", "target.prefix"]
    assert ch["orphans"] == {"objects": len(drop), "bytes": sum(drop.values())}
    assert ch["reroutes"] == {"objects": 0, "bytes": 0} and ch["must_copy"] == {"objects": 0, "bytes": 0}
    assert set(ch["examples"]["orphans"]) <= {f"idcb-drive/camera/{k}" for k in drop}
    assert ch["newly_covered"] == {"objects": 0, "bytes": 0}  # narrower: the listing finds nothing new
    assert [r["dataset"] for r in rep["readiness"]] == [f"ds-{tag}"]
    assert "1 files no longer mirrored into B" in rep["readiness"][0]["reasons"][0]
    assert len(keep) == 6  # the kept ones are counted nowhere (orphans are exactly the dropped ones)


def test_a_wider_route_counts_the_uncatalogued_objects_it_must_copy(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    """The other way round: a route that now covers objects of the source nobody mirrored yet."""
    files = write_files(tmp_path / "src", {f"{tag}/n{i}.bin": 300 + i for i in range(5)})
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, f"extra-{tag}/")  # no route covers extra-<tag>/ yet
    data = config_data(xcfg)
    new_data = copy.deepcopy(data)
    new_data["routes"].append({"name": "extra", "mode": "data",
                               "source": {"dc": "A", "bucket": SRC, "prefix": f"extra-{tag}/"},
                               "target": {"dc": "B", "bucket": "idcb-drive", "prefix": f"extra-{tag}/"}})
    rep = impact(topo(xcfg, "B"), cfg_of(new_data, xcfg)).to_dict()
    (ch,) = rep["routes"]
    assert ch["route"] == "extra" and ch["change"] == "added"
    assert ch["newly_covered"] == ch["must_copy"] == {"objects": len(files), "bytes": sum(files.values())}


def test_cli_reports_an_introduced_bucket_collision_and_endpoint_mistake(xcfg: XdcConfig, tmp_path: Path) -> None:
    data = config_data(xcfg)
    live_file = tmp_path / "live.yaml"
    live_file.write_text(yaml.safe_dump(data))
    new = copy.deepcopy(data)
    new["datacenters"]["B"]["buckets"] = [*new["datacenters"]["B"].get("buckets", []), SRC]
    new["datacenters"]["A"]["s3"]["external_url"] = new["datacenters"]["B"]["s3"]["internal_url"]
    new_file = tmp_path / "new.yaml"
    new_file.write_text(yaml.safe_dump(new))
    cp = subprocess.run([sys.executable, "-m", "xdc.app.cli", "--config", str(live_file), "--dc", "B", "config",
                         "impact", str(new_file), "--json"], cwd=ROOT, env=child_env(), capture_output=True,
                        text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr[-2000:]
    rep = json.loads(cp.stdout)
    (col,) = rep["collisions"]
    assert f"bucket '{SRC}' is used in datacenters A and B" in col
    assert any("A: s3.external_url" in e and "datacenter B's internal endpoint" in e for e in rep["endpoints"])
    assert rep["routes"] == [] and rep["cache"] == []
    # the same file is refused by the loader: the collision is a real mistake, not an impact artefact
    chk = subprocess.run([sys.executable, "-m", "xdc.app.cli", "config", "check", str(new_file)], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert chk.returncode == 2 and "bucket 'idca-drive' is used in datacenters A and B" in chk.stderr
