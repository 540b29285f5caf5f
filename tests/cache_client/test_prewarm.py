"""The prewarm flow on the in-memory cluster: ready gate, re-warm rounds, reports, ref-counted free."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cache_client.fake import FakeCluster
from cache_client.plan import MIB
from cache_client.prewarm.pipeline import (
    Request,
    check_list,
    free_list,
    plan_prewarm,
    run_prewarm,
    to_cache_file,
    wait_ready,
)
from cache_client.prewarm.progress import Progress
from tests.support import site
from xdc.config import CacheConfig, CacheNode, ResizeSettings, XdcConfig
from xdc.errors import NotReadyError
from xdc.topology import Site

pytestmark = pytest.mark.both_backends

CACHE = CacheConfig(meta_url="sqlite3:///unused.db",
                    nodes=[CacheNode(name=n, mount=Path(f"/unused/{n}"), cache_dir=Path("/unused")) for n in ("n1", "n2")])
QUIET = Progress(render="none")


@pytest.fixture
def cfg(tmp_path: Path, make_config: Callable[..., XdcConfig]) -> XdcConfig:
    return make_config(CACHE, tmp_path, ["bkt"], max_rewarm_rounds=1)


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def fake(n: int = 4) -> FakeCluster:
    return FakeCluster(volume={f"bkt/k{i}": MIB for i in range(n)})


def at(cfg: XdcConfig, cluster: FakeCluster | None = None) -> Site:
    """The test's datacenter, with the in-memory cluster standing in for its cache."""
    s = site(cfg, "dca")
    if cluster is not None:
        s.cache = cluster  # type: ignore[misc]
    return s


def test_run_rewarms_misses_and_reports_to_json(cfg: XdcConfig, tmp_path: Path) -> None:
    c = fake()
    c.lose["n2"] = {"bkt/k1"}
    lst = write(tmp_path, "l.txt", [f"bkt/k{i}" for i in range(4)] + ["bkt/k0", "bkt/absent"])
    report = run_prewarm(at(cfg, c), Request(str(lst), "ds", version="7"), progress=QUIET, wait=False)
    assert len(report.rounds) == 2 and report.rounds[1]["files"] == 1  # only the partly loaded file again
    assert report.check.counts == {"cached": 4, "partial": 0, "not_cached": 0, "missing": 1}
    assert report.not_cached == [{"bucket_key": "bkt/absent", "status": "missing", "reason": "not in this datacenter's volume"}]
    assert report.registered_keys == 5 and report.list_entries == 5  # duplicate line dropped by the reader
    d = json.loads(json.dumps(report.to_dict()))
    assert d["plan"]["warm_bytes"] == 8 * MIB and d["complete"] is False
    assert "INCOMPLETE, 1 not cached" in report.summary()
    assert [r.dataset for r in at(cfg).state.prewarm.registrations()] == ["ds"]


def test_rounds_exhausted_says_why(cfg: XdcConfig, tmp_path: Path) -> None:
    c = fake(2)
    c.lose["n1"] = {"bkt/k0"}
    cfg0 = cfg.model_copy(update={"prewarm": cfg.prewarm.model_copy(update={"max_rewarm_rounds": 0})})
    report = run_prewarm(at(cfg0, c), Request(str(write(tmp_path, "l.txt", ["bkt/k0", "bkt/k1"]))), progress=QUIET)
    assert report.not_cached == [{"bucket_key": "bkt/k0", "status": "partial", "reason": "not cached on n1: 524288 of 1048576 bytes"}]


def test_second_run_is_a_noop(cfg: XdcConfig, tmp_path: Path) -> None:
    c = fake()
    lst = write(tmp_path, "l.txt", [f"bkt/k{i}" for i in range(4)])
    run_prewarm(at(cfg, c), Request(str(lst)), progress=QUIET)
    plan = plan_prewarm(at(cfg, c), Request(str(lst)))
    assert plan.noop and plan.cached_files == 4
    again = run_prewarm(at(cfg, c), Request(str(lst)), progress=QUIET)
    assert again.complete and again.warmed_files == 0 and len(c.warm_calls) == 2  # first run only, 2 nodes


def test_bandwidth_from_earlier_runs_drives_the_eta(cfg: XdcConfig, tmp_path: Path) -> None:
    at(cfg).state.prewarm.record_run(200 * MIB, 0, 10.0)  # 20 MiB/s learnt
    plan = plan_prewarm(at(cfg, fake()), Request(str(write(tmp_path, "l.txt", ["bkt/k0", "bkt/k1"]))))
    assert plan.bandwidth.source == "measured (1 runs)"
    assert plan.eta_seconds == pytest.approx(4 * MIB / (20 * MIB) + 4 * plan.bandwidth.per_file_s)


def test_ready_gate(cfg: XdcConfig, tmp_path: Path) -> None:
    c = fake(1)
    with pytest.raises(NotReadyError, match=r"1 of 2 files not in the datacenter.*bkt/late") as exc:
        wait_ready(at(cfg, c), [to_cache_file(k, "") for k in ("bkt/k0", "bkt/late")], timeout=0)
    assert exc.value.missing == ["bkt/late"]  # type: ignore[attr-defined]

    class Arriving(FakeCluster):
        def stat(self, files):  # type: ignore[no-untyped-def]
            self.volume["bkt/late"] = 10  # mirrored while we wait
            return super().stat(files)

    wait_ready(at(cfg, Arriving()), [to_cache_file("bkt/late", "")], timeout=5, poll=0.01)
    lst = write(tmp_path, "l.txt", ["bkt/k0", "bkt/never"])
    with pytest.raises(NotReadyError):
        run_prewarm(at(cfg, c), Request(str(lst)), progress=QUIET, ready_timeout=0)


def test_rejected_entries_are_reported(cfg: XdcConfig, tmp_path: Path) -> None:
    lst = write(tmp_path, "l.txt", ["bkt/k0", "otherbucket/x", "/abs"])
    report = check_list(at(cfg, fake()), Request(str(lst)))
    assert report.counts["cached"] == 0 and len(report.rejected) == 2 and not report.complete
    assert any("no_route" in r for _, r in report.rejected)


def test_prefer_derived(tmp_path: Path, make_config: Callable[..., XdcConfig]) -> None:
    cfg = make_config(CACHE, tmp_path, ["bkt"], prefer_derived=True)
    cfg = cfg.model_copy(update={"resize": ResizeSettings(bucket="bkt")})  # raw/ -> 720p/
    c = FakeCluster(volume={"bkt/raw/a.jpg": 5 * MIB, "bkt/720p/a.jpg": MIB, "bkt/raw/b.jpg": 5 * MIB})
    plan = plan_prewarm(at(cfg, c), Request(str(write(tmp_path, "l.txt", ["bkt/raw/a.jpg", "bkt/raw/b.jpg"]))))
    assert plan.bytes == 6 * MIB  # a's derivative (1 MiB) + b's original (no derivative yet)


def test_free_keeps_files_of_other_active_datasets(cfg: XdcConfig, tmp_path: Path) -> None:
    c = fake(3)
    a = write(tmp_path, "a.txt", ["bkt/k0", "bkt/k1"])
    b = write(tmp_path, "b.txt", ["bkt/k1", "bkt/k2"])
    run_prewarm(at(cfg, c), Request(str(a), "A"), progress=QUIET)
    run_prewarm(at(cfg, c), Request(str(b), "B"), progress=QUIET)
    rep = free_list(at(cfg, c), Request(str(a), "A"))
    assert rep.kept == {"bkt/k1": ["B@"]} and rep.files == 1 and "kept 1 files" in rep.summary()
    assert sorted(c.cache["n1"]) == ["bkt/k1", "bkt/k2"]
    rep = free_list(at(cfg, c), Request(str(b), "B"))  # A is retired now: nothing holds k1
    assert rep.kept == {} and c.cache == {"n1": {}, "n2": {}}
