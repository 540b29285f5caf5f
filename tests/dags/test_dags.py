"""The project's DAGs (dags/), each run with dag.test() against the real local two-DC stack.

Assertions are on effects: objects in the target store, derivatives written, cache state checked
per file on the real JuiceFS mounts, lag rows in the catalog.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cache_client.prewarm.pipeline import Request, check_list
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.support import site, topo
from xdc.config import XdcConfig, load_config

pytestmark = pytest.mark.both_backends

SRC, DST = "idca-drive", "idcb-drive"
DAG_IDS = {"xdc_mirror", "xdc_resize", "xdc_prewarm", "xdc_free", "xdc_lag_monitor"}


@pytest.fixture
def config_file(xcfg: XdcConfig, tmp_path: Path, tag: str, config_writer: Callable[..., Path],
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The test's config as a file, XDC_CONFIG pointing at it (read while parsing and in tasks)."""
    path = config_writer(xcfg, tmp_path / "xdc.yaml", tag)
    monkeypatch.setenv("XDC_CONFIG", str(path))
    yield path


def mapped_xcoms(dag_run: Any, task_id: str) -> list[Any]:
    """The XComs of every map index of a mapped task in a finished dag.test() run, in index order."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=task_id,
                                                  key="return_value", map_indexes=None)).all()
        return [XComModel.deserialize_value(r) for r in sorted(rows, key=lambda r: r.map_index)]


def test_dags_import_with_and_without_config(airflow_home: Path, config_file: Path, xcfg: XdcConfig,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    dags = Path(__file__).resolve().parents[2] / "dags"
    bag = DagBag(dag_folder=str(dags))
    assert not bag.import_errors, bag.import_errors
    assert DAG_IDS <= set(bag.dags)
    assert [t.task_id for t in bag.dags["xdc_mirror"].tasks] == ["mirror_into_B"]
    release = bag.dags["xdc_prewarm"].timetable.asset_condition.objects[0]
    assert release.name == "xdc-release"
    assert release.watchers[0].trigger.serialize()[1]["topics"] == [xcfg.dc("A").kafka.topics.releases]  # A's broker only
    assert bag.dags["xdc_lag_monitor"].max_active_runs == 1

    monkeypatch.delenv("XDC_CONFIG")
    bare = DagBag(dag_folder=str(dags))
    assert not bare.import_errors, bare.import_errors  # a fresh Airflow with no config still parses
    assert type(bare.dags["xdc_prewarm"].timetable).__name__ == "NullTimetable"  # manual/REST only
    assert [t.task_id for t in bare.dags["xdc_mirror"].tasks] == ["no_routes"]


def test_mirror_dag_then_lag_monitor(run_dag: Callable[..., Any], dag_xcom: Callable[..., Any], config_file: Path,
                                     config_writer: Callable[..., Path], file_maker: Callable[..., dict[str, bytes]],
                                     xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    files = file_maker(tmp_path / "src", tag, 4)
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, "camera/")

    run = run_dag("xdc_mirror")
    assert run.state == "success"
    stats = dag_xcom(run, "mirror_into_B")
    assert stats["applied"] == 4 and stats["dead_letters"] == 0
    dst = site(xcfg, "B", seen_from="B").store
    for key, data in files.items():
        assert dst.get(DST, key) == data
    assert site(xcfg, "B").state.catalog.get(DST, next(iter(files))) is not None

    run = run_dag("xdc_lag_monitor")
    assert run.state == "success"
    rows = site(xcfg, "B").state.lag.latest()
    camera = next(r for r in rows if r["route"] == "camera")
    assert camera["events"] == 4 and camera["p99"] is not None
    assert dag_xcom(run, "objective")["routes"] == len([r for r in xcfg.routes if r.target.dc == "B"])

    # An objective no real lag can meet: the monitor fails, and still recorded its snapshot.
    config_writer(xcfg, config_file, tag, lag={"objective_p99_seconds": 1e-9})
    before = len(site(xcfg, "B").state.lag.history(0))
    run = run_dag("xdc_lag_monitor")
    assert run.state == "failed"
    assert len(site(xcfg, "B").state.lag.history(0)) > before


def test_resize_dag_writes_derivatives(run_dag: Callable[..., Any], dag_xcom: Callable[..., Any], config_file: Path,
                                       xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    from devtools.samples import make_frame

    frames = tmp_path / "frames" / tag
    frames.mkdir(parents=True)
    for i in range(2):
        (frames / f"cam{i}.jpg").write_bytes(make_frame(i))
    ingest(site(xcfg, "A"), tmp_path / "frames", SRC, "camera/raw/")

    run = run_dag("xdc_resize", conf={"shards": 2})
    assert run.state == "success"
    total = dag_xcom(run, "summary")
    assert total["shards"] == 2 and total["results"].get("resized") == 2
    derived = list(site(xcfg, "A").store.list(SRC, f"camera/720p/{tag}/"))
    assert len(derived) == 2 and all(o.size < 1_000_000 for o in derived)


def test_prewarm_then_free(run_dag: Callable[..., Any], dag_xcom: Callable[..., Any], config_file: Path,
                           file_maker: Callable[..., dict[str, bytes]], xcfg: XdcConfig, tmp_path: Path,
                           tag: str) -> None:
    files = file_maker(tmp_path / "src", tag, 5)
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, "camera/")
    with Mirror(topo(xcfg, "B"), group_id=f"{tag}-lib-mirror") as m:
        assert m.run(once=True).applied == 5
    listing = tmp_path / "release.txt"
    listing.write_text("".join(f"{SRC}/{k}\n" for k in files))  # keys as released in IDC-A
    cfg = load_config(config_file)

    conf = {"dataset": f"ds-{tag}", "version": "v1", "manifest": str(listing), "datacenters": ["A", "B"]}
    run = run_dag("xdc_prewarm", conf=conf)
    assert run.state == "success"
    for dc in ("A", "B"):
        check = check_list(site(cfg, dc), Request(str(listing)))
        assert check.complete and check.cached_ratio == 1.0 and len(check.files) == 5, check.summary()
    plans = mapped_xcoms(run, "plan")
    assert {p["unit"]["dc"] for p in plans} == {"A", "B"}
    assert all(p["plan"]["warm_files"] == 10 and p["plan"]["eta_seconds"] > 0 for p in plans)  # 5 files x 2 nodes
    assert len(mapped_xcoms(run, "warm")) == 4  # mapped over (DC, node)
    assert all(len(c["warm_nodes"]) == 2 and not c["not_cached"] for c in mapped_xcoms(run, "check"))
    report = dag_xcom(run, "report")
    assert {(r["dc"], r["complete"], r["cached_ratio"]) for r in report} == {("A", True, 1.0), ("B", True, 1.0)}

    # Released again: nothing left to load, the warm step maps over nothing and is skipped.
    run = run_dag("xdc_prewarm", conf=conf)
    assert run.state == "success"
    assert all(p["plan"]["warm_files"] == 0 and p["plan"]["cached_files"] == 5 for p in mapped_xcoms(run, "plan"))
    assert run.get_task_instance("warm").state == "skipped"
    assert all(r["complete"] for r in dag_xcom(run, "report"))

    run = run_dag("xdc_free", conf={"dataset": f"ds-{tag}", "datacenters": ["A", "B"]})
    assert run.state == "success"
    for dc in ("A", "B"):
        check = check_list(site(cfg, dc), Request(str(listing)))
        assert check.counts["not_cached"] == 5 and check.bytes_cached == 0, check.summary()
    freed = dag_xcom(run, "report")
    assert {r["dc"] for r in freed} == {"A", "B"} and all(r["complete"] for r in freed)


# -- the glue the DAGs call, without servers ---------------------------------------------------------
def two_dc_config(tmp_path: Path, **over: Any) -> XdcConfig:
    from xdc.config import parse_config

    def dc(port: int, bootstrap: str) -> dict[str, Any]:
        return {"s3": {"internal_url": f"http://127.0.0.1:{port}", "external_url": f"http://127.0.0.1:{port}",
                       "credentials": {"access_key_env": "AK", "secret_key_env": "SK"}},
                "kafka": {"bootstrap_servers": [bootstrap], "topics": {"releases": f"rel-{port}"}, "partitions": 3},
                "state_url": f"sqlite:///{tmp_path / f'{port}.db'}",
                "cache": {"meta_url": "sqlite3:///x.db", "nodes": [{"name": "n1", "mount": "/m", "cache_dir": "/c"}]}}
    data = {"local_dc": "A", "datacenters": {"A": dc(1, "k:1"), "B": dc(2, "k:2"), "C": dc(3, "k:1")},
            "routes": [{"source": {"dc": "A", "bucket": "src-a"}, "target": {"dc": "B", "bucket": "dst-b"}}],
            "resize": {"bucket": "src-a"}} | over
    return parse_config(data, base_dir=tmp_path)


def test_watch_targets_and_shards_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xdc.app.airflow_support import mirror_targets, release_watch, schedule_from_env
    from xdc.app.airflow_tasks import resize_shards
    from xdc.config import parse_config

    cfg = two_dc_config(tmp_path)
    assert release_watch(cfg) == (["rel-1", "rel-3"], "xdc_kafka")  # A's broker carries A's and C's topics
    assert mirror_targets(cfg) == ["B"]
    assert resize_shards(cfg, 8) == [0] and resize_shards(cfg, 0) == [0]  # SQLite state takes one resize process
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    data["datacenters"]["A"]["state_url"] = "postgresql://xdc@127.0.0.1:1/xdc"  # known from the URL, never connected
    on_pg = parse_config(data, base_dir=tmp_path)
    assert resize_shards(on_pg, 8) == [0, 1, 2] and resize_shards(on_pg, 2) == [0, 1]  # one per partition at most
    monkeypatch.setenv("XDC_X_SCHEDULE", "none")
    assert schedule_from_env("XDC_X_SCHEDULE") is None and schedule_from_env("XDC_UNSET") == "* * * * *"


def test_prewarm_units_and_warm_jobs(tmp_path: Path) -> None:
    from xdc.app.airflow_tasks import prewarm_units, release_from_params, warm_jobs
    from xdc.errors import ConfigError

    cfg = two_dc_config(tmp_path)
    manual = release_from_params({"dataset": "ds", "version": "v1", "manifest": "/l.txt", "datacenters": ["B"]})
    assert manual is not None and release_from_params({"dataset": "ds"}) is None
    every = dict(manual, datacenters=[])  # no datacenters named: every DC with a cache
    units = prewarm_units(cfg, [manual, every])
    assert [(u["release"]["datacenters"], u["dc"]) for u in units] == [(["B"], "B"), ([], "A"), ([], "B"), ([], "C")]
    with pytest.raises(ConfigError):
        prewarm_units(cfg, [dict(manual, datacenters=["Z"])])
    plans = [{"unit": units[0], "plan": {"nodes": {"n2": {"files": 3}, "n1": {"files": 1}, "n3": {"files": 0}}}}]
    assert [j["node"] for j in warm_jobs(plans)] == ["n1", "n2"]  # nothing to load on n3: no task


def test_outcomes_fail_the_run_when_incomplete(tmp_path: Path) -> None:
    from xdc.app.airflow_tasks import (
        enforce_lag_objective,
        free_outcome,
        prewarm_outcome,
        sum_resize_stats,
    )
    from xdc.errors import CacheError, LagObjectiveError

    cfg = two_dc_config(tmp_path, lag={"objective_p99_seconds": 5})
    rows = [{"route": "r1", "p99": 1.0}, {"route": "r2", "p99": None}]
    assert enforce_lag_objective(cfg, [{"dc": "B", "rows": rows}])["worst_p99"] == 1.0
    with pytest.raises(LagObjectiveError, match="r3: p99 7.000s"):
        enforce_lag_objective(cfg, [{"dc": "B", "rows": rows + [{"route": "r3", "p99": 7.0}]}])

    check = {"dc": "B", "dataset": "ds", "version": "1", "complete": False, "seconds": 1.0, "summary": "s",
             "check": {"cached_ratio": 0.5, "files": 2}, "not_cached_count": 1,
             "not_cached": [{"bucket_key": "b/k", "reason": "not cached on n1: 0 of 9 bytes"}]}
    with pytest.raises(CacheError, match=r"ds@1 in B: 1 not cached, e.g. b/k \(not cached on n1"):
        prewarm_outcome([check])
    assert prewarm_outcome([check | {"complete": True}])[0]["cached_ratio"] == 0.5
    with pytest.raises(CacheError, match="still cached"):
        free_outcome([{"dc": "B", "complete": False, "left_bytes": {"n1": 9}}])

    shards = [{"frames": 2, "bytes_in": 10, "bytes_out": 2, "results": {"resized": 2}},
              {"frames": 1, "bytes_in": 0, "bytes_out": 0, "results": {"done_before": 1}}]
    assert sum_resize_stats(shards) == {"shards": 2, "frames": 3, "bytes_in": 10, "bytes_out": 2,
                                        "results": {"resized": 2, "done_before": 1}, "ratio": 5.0}
