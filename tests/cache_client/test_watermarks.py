"""Watermarks: which retired datasets make room, oldest first and reference-counted (pure choice, then
the pipeline on the in-memory cluster with real state on SQLite and PostgreSQL)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cache_client.base import CacheFile
from cache_client.fake import FakeCluster
from cache_client.plan import MIB, NodeCapacity
from cache_client.prewarm.pipeline import Request, plan_prewarm, retire, run_prewarm
from cache_client.prewarm.progress import Progress
from cache_client.watermarks import Retired, plan_room
from tests.support import site
from xdc.config import CacheConfig, CacheNode, XdcConfig, parse_config
from xdc.errors import CapacityError, ConfigError, RoomError
from xdc.topology import Site

QUIET = Progress(render="none")


def retired(name: str, t: float, **by_node: int) -> Retired:
    return Retired(name, "1", t, {n: [CacheFile(f"b/{name}", f"b/{name}")] for n in by_node}, dict(by_node))


def test_room_takes_the_oldest_retired_until_under_the_low_watermark() -> None:
    caps = {"n1": NodeCapacity(used=70 * MIB, capacity=100 * MIB, high=0.9, low=0.6),
            "n2": NodeCapacity(used=10 * MIB, capacity=100 * MIB, high=0.9, low=0.6)}
    old, mid, new = retired("old", 1.0, n1=8 * MIB, n2=8 * MIB), retired("mid", 2.0, n1=20 * MIB), retired("new", 3.0, n1=50 * MIB)
    room = plan_room(caps, {"n1": 30 * MIB, "n2": 30 * MIB}, [old, mid, new])
    assert list(room.nodes) == ["n1"]  # n2 ends at 40 %: under its high watermark, untouched
    n1 = room.nodes["n1"]  # 100 % without room; under 60 % needs 40 MiB: old (8) + mid (20) + new (50)
    assert [(r.dataset, b) for r, b in n1.frees] == [("old", 8 * MIB), ("mid", 20 * MIB), ("new", 50 * MIB)]
    assert n1.under_low and room.enough and n1.share(n1.after) == pytest.approx(0.22)
    assert [r.dataset for r, _ in room.datasets()] == ["old", "mid", "new"]
    caps["n1"] = NodeCapacity(used=70 * MIB, capacity=100 * MIB, high=0.9, low=0.8)
    room = plan_room(caps, {"n1": 21 * MIB}, [old, mid, new])  # 91 %: 11 MiB to free: old + mid, new stays
    assert [r.dataset for r, _ in room.nodes["n1"].frees] == ["old", "mid"] and room.nodes["n1"].under_low
    caps["n1"] = NodeCapacity(used=70 * MIB, capacity=100 * MIB, high=0.9, low=0.6)
    room = plan_room(caps, {"n1": 21 * MIB}, [mid, old])  # the caller's order is the retirement order
    assert [r.dataset for r, _ in room.nodes["n1"].frees] == ["mid", "old"]  # 31 MiB to free: mid 20 + old 8 < 31
    assert room.enough and not room.nodes["n1"].under_low  # 63 %: under high, not under low
    assert "n1 would be 91% full (high watermark 90%, low 60%); freeing mid@1 20.0 MiB, old@1 8.0 MiB" in room.refusal()


def test_room_that_is_not_enough_says_so() -> None:
    caps = {"n1": NodeCapacity(used=80 * MIB, capacity=100 * MIB, high=0.9, low=0.8)}
    room = plan_room(caps, {"n1": 30 * MIB}, [retired("old", 1.0, n1=5 * MIB)])
    assert not room.enough and "not enough" in room.refusal()
    assert not plan_room(caps, {"n1": 10 * MIB}, []).needed  # exactly at the high watermark: not over
    assert plan_room(caps, {"n1": 10 * MIB + 1}, []).nodes["n1"].frees == []


def test_watermarks_in_the_config() -> None:
    nodes = [{"name": "a", "mount": "/m", "cache_dir": "/c"},
             {"name": "b", "mount": "/m", "cache_dir": "/c", "high_watermark": 0.8, "low_watermark": 0.5}]
    cache = CacheConfig.model_validate({"meta_url": "x", "nodes": nodes, "high_watermark": 0.95, "low_watermark": 0.7})
    assert cache.watermarks("a") == (0.95, 0.7) and cache.watermarks("b") == (0.8, 0.5)
    assert CacheConfig.model_validate({"meta_url": "x", "nodes": nodes[:1]}).watermarks("a") == (1.0, 1.0)
    with pytest.raises(ValueError, match="low_watermark 0.9 is above high_watermark 0.8"):
        CacheConfig.model_validate({"meta_url": "x", "nodes": [dict(nodes[0], high_watermark=0.8, low_watermark=0.9)]})
    with pytest.raises(ConfigError, match="high_watermark"):
        parse_config({"datacenters": {"A": {"s3": {"internal_url": "http://x", "external_url": "http://x",
                                                   "credentials": {"access_key_env": "a", "secret_key_env": "b"}},
                                            "kafka": {"bootstrap_servers": ["k:1"]},
                                            "cache": {"meta_url": "x", "nodes": nodes[:1], "high_watermark": 1.5}}}})


# -- the pipeline: retired datasets' files only, reference-counted ---------------------------------
pytestmark = pytest.mark.both_backends

CACHE = CacheConfig(meta_url="sqlite3:///unused.db", high_watermark=0.8, low_watermark=0.5,
                    nodes=[CacheNode(name=n, mount=Path(f"/unused/{n}"), cache_dir=Path("/unused")) for n in ("n1", "n2")])


@pytest.fixture
def cfg(tmp_path: Path, make_config: Callable[..., XdcConfig]) -> XdcConfig:
    return make_config(CACHE, tmp_path, ["bkt"])


def at(cfg: XdcConfig, cluster: FakeCluster) -> Site:
    s = site(cfg, "dca")
    s.cache = cluster  # type: ignore[misc]
    return s


def listing(tmp_path: Path, name: str, keys: list[str]) -> str:
    p = tmp_path / f"{name}.txt"
    p.write_text("".join(f"bkt/{k}\n" for k in keys))
    return str(p)


def test_make_room_frees_only_retired_files_oldest_first(cfg: XdcConfig, tmp_path: Path) -> None:
    vol = {f"bkt/{k}": MIB for k in ("o1", "o2", "shared", "m1", "k1", "n1", "n2", "n3", "s1")}
    c = FakeCluster(volume=vol, capacity=10 * MIB, watermarks={"n1": (0.8, 0.5), "n2": (0.8, 0.5)})
    here = at(cfg, c)
    run_prewarm(here, Request(listing(tmp_path, "old", ["o1", "o2", "shared"]), "old", "1"), progress=QUIET)
    run_prewarm(here, Request(listing(tmp_path, "mid", ["m1"]), "mid", "1"), progress=QUIET)
    run_prewarm(here, Request(listing(tmp_path, "keep", ["shared", "k1"]), "keep", "1"), progress=QUIET)
    retire(here, "old", "1")
    retire(here, "mid", "1")
    here.state.prewarm.stage("next", "1", ["bkt/s1"], None, {})  # a prewarm in flight holds its files too
    c.cache["n1"]["bkt/s1"] = c.cache["n2"]["bkt/s1"] = MIB  # ... some already loaded
    assert c.usage("n1") == (6 * MIB, 10 * MIB)

    new = Request(listing(tmp_path, "new", ["n1", "n2", "n3", "o2"]), "new", "1")  # o2: the new list holds it
    # 6 + 3 MiB to load = 90 % > 80 %; under 50 % needs 4 MiB freed: old's o1 only (1 MiB; o2 is in the
    # list, shared is keep's) is not enough, so mid's m1 goes too -- and then nothing more is retired.
    with pytest.raises(RoomError) as exc:
        plan_prewarm(here, new)
    assert "n1 would be 90% full (high watermark 80%, low 50%); freeing old@1 1.0 MiB, mid@1 1.0 MiB" in str(exc.value)
    assert [d["dataset"] for d in exc.value.room["datasets"]] == ["old", "mid"]
    assert c.cache["n1"]["bkt/o1"] == MIB  # refused: nothing evicted

    preview = plan_prewarm(here, Request(new.manifest, "new", "1", make_room=True))  # the plan only names them
    assert preview.room is not None and not preview.room.made and "bkt/o1" in c.cache["n1"]
    report = run_prewarm(here, Request(new.manifest, "new", "1", make_room=True), progress=QUIET)
    assert report.complete and report.plan.room is not None and report.plan.room.made
    for node in ("n1", "n2"):
        assert sorted(c.cache[node]) == ["bkt/k1", "bkt/n1", "bkt/n2", "bkt/n3", "bkt/o2", "bkt/s1", "bkt/shared"]
    ev = here.state.prewarm.evictions()
    assert sorted((e["dataset"], e["node"], e["files"], e["bytes"]) for e in ev) == [
        ("mid", "n1", 1, MIB), ("mid", "n2", 1, MIB), ("old", "n1", 1, MIB), ("old", "n2", 1, MIB)]
    fill = {n.node: (n.used, n.high_watermark, n.low_watermark) for n in here.state.prewarm.nodes()}
    assert fill == {"n1": (7 * MIB, 0.8, 0.5), "n2": (7 * MIB, 0.8, 0.5)}


def test_nothing_retired_to_free_is_a_plain_capacity_error_and_trim_still_works(cfg: XdcConfig, tmp_path: Path) -> None:
    c = FakeCluster(volume={f"bkt/k{i}": MIB for i in range(10)}, capacity=10 * MIB, watermarks={"n1": (0.5, 0.5)})
    here = at(cfg, c)
    lst = listing(tmp_path, "big", [f"k{i}" for i in range(8)])
    with pytest.raises(CapacityError, match=r"n1: needs 8\.0 MiB, free 5\.0 MiB .*high watermark 50%") as exc:
        plan_prewarm(here, Request(lst, make_room=True))
    assert not isinstance(exc.value, RoomError)  # n2 has no watermark: 8 of 10 MiB fits there
    plan = plan_prewarm(here, Request(lst), trim=True)
    assert (len(plan.shares["n1"].files), len(plan.shares["n2"].files)) == (5, 8)
