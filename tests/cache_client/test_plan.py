"""Planning, ETA and progress on the in-memory cluster (pure logic, no servers)."""
from __future__ import annotations

import pytest

from cache_client.base import CacheFile, FileStatus, get_backend
from cache_client.fake import FakeCluster
from cache_client.placement import BalancedPlacement
from cache_client.plan import MIB, Bandwidth, footprint
from cache_client.prewarm.progress import Progress, blended_eta
from xdc.errors import CacheError, CapacityError


def files(n: int, size: int = MIB) -> list[CacheFile]:
    return [CacheFile(f"b/k{i}", f"b/k{i}", None) for i in range(n)]


def cluster(n: int = 4, size: int = MIB, **kw: object) -> FakeCluster:
    return FakeCluster(volume={f.path: size for f in files(n)}, **kw)  # type: ignore[arg-type]


def test_plan_counts_what_is_there_and_cached() -> None:
    c = cluster(4)
    c.cache["n1"] = {"b/k0": MIB, "b/k1": MIB // 2}
    c.cache["n2"] = {"b/k0": MIB}
    plan = c.plan([*files(4), CacheFile("b/gone", "b/gone")])
    assert plan.files == 5 and plan.bytes == 4 * MIB and [f.path for f in plan.missing] == ["b/gone"]
    assert (plan.cached_files, plan.cached_bytes) == (1, MIB)
    assert (len(plan.shares["n1"].files), plan.shares["n1"].bytes) == (3, MIB // 2 + 2 * MIB)
    assert (len(plan.shares["n2"].files), plan.shares["n2"].bytes) == (3, 3 * MIB)
    d = plan.to_dict()
    assert d["missing"] == ["b/gone"] and d["warm_files"] == 6 and d["nodes"]["n1"]["cached_files"] == 1
    assert "1 missing" in plan.summary()


def test_eta_model() -> None:
    bw = Bandwidth(bytes_per_s=10 * MIB, per_file_s=0.01)
    plan = cluster(10).plan(files(10), bandwidth=bw)
    assert plan.eta_seconds == pytest.approx(20 * MIB / (10 * MIB) + 20 * 0.01)


def test_capacity_refused_with_numbers_or_trimmed() -> None:
    c = cluster(4, capacity=3 * MIB)
    c.cache["n2"] = {"b/x": MIB}  # used space counts
    with pytest.raises(CapacityError, match=r"n1: needs 4\.0 MiB, free 3\.0 MiB.*n2: needs 4\.0 MiB, free 2\.0 MiB"):
        c.plan(files(4))
    plan = c.plan(files(4), trim=True)
    assert [len(plan.shares[n].files) for n in ("n1", "n2")] == [3, 2]
    assert [f.path for n, f in plan.dropped if n == "n2"] == ["b/k2", "b/k3"]
    assert plan.trimmed and "dropped" in plan.summary()


def test_footprint_rounds_to_pages() -> None:
    assert (footprint(0), footprint(1), footprint(4096), footprint(4097)) == (0, 4096, 4096, 8192)


def test_shard_plan_follows_the_placement() -> None:
    c = cluster(50, placement="shard", virtual_nodes=16)
    plan = c.plan(files(50))
    sized = [CacheFile(f.bucket_key, f.path, c.volume[f.path]) for f in files(50)]
    owner = BalancedPlacement(["n1", "n2"]).assign([f.bucket_key for f in sized], [f.size for f in sized])
    assert {n: [f.bucket_key for f in s.files] for n, s in plan.shares.items()} == owner
    assert plan.warm_files == 50


def test_warm_check_free_on_fake() -> None:
    c = cluster(3)
    c.lose["n2"] = {"b/k1"}
    plan = c.plan(files(3))
    report = c.warm(plan)
    assert report.files == 6 and not report.errors
    check = c.check(files(3))
    assert [f.status for f in check.files] == [FileStatus.CACHED, FileStatus.PARTIAL, FileStatus.CACHED]
    assert "n2: 524288 of 1048576 bytes" in check.files[1].reason
    assert check.cached_ratio == pytest.approx(5.5 / 6)
    freed = c.free(files(3))
    assert freed.complete and freed.freed_bytes == {"n1": 3 * MIB, "n2": 2 * MIB + MIB // 2}


def test_registry() -> None:
    assert get_backend("fake") is FakeCluster
    with pytest.raises(CacheError, match="unknown cache backend"):
        get_backend("jindo")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_blends_plan_with_observed_rate() -> None:
    clock = Clock()
    seen = []
    p = Progress(Bandwidth(bytes_per_s=10 * MIB, per_file_s=0.0), render="none", clock=clock, callback=seen.append)
    p.start(100, 100 * MIB)  # plan: 10 s
    assert p.snapshot().eta_seconds == pytest.approx(10.0)
    clock.t = 2.0  # twice slower than planned: 10 % after 2 s
    p.add(10, 10 * MIB)
    s = p.snapshot()
    assert s.fraction == pytest.approx(0.1) and s.rate_bytes_s == pytest.approx(5 * MIB)
    # 0.9 * planned 9 s + 0.1 * observed 18 s
    assert s.eta_seconds == pytest.approx(0.9 * 9 + 0.1 * 18)
    clock.t = 10.0
    p.add(40, 40 * MIB)
    assert p.snapshot().eta_seconds == pytest.approx(0.5 * 5 + 0.5 * 10)
    p.add(1000, 1000 * MIB)  # clamped to the total
    p.finish()
    assert p.snapshot().eta_seconds == 0.0 and p.snapshot().files_done == 100
    assert seen and seen[-1].fraction == 1.0 and "100/100 files" in seen[-1].line()


def test_blended_eta_edges() -> None:
    assert blended_eta(7.0, 0.0, 0.0) == 7.0
    assert blended_eta(7.0, 3.0, 1.0) == 0.0


def test_progress_log_render(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="xdc.prewarm")
    p = Progress(render="log", log_every_s=0)
    p.start(2, 2 * MIB)
    p.add(1, MIB)
    p.finish()
    assert any("1/2 files" in r.message for r in caplog.records)
