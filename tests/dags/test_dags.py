"""The project's DAGs (dags/), each run with dag.test() against the real local two-DC stack.

Assertions are on effects: objects in the target store, derivatives written, cache state checked
per file on the real JuiceFS mounts, lag rows in the catalog.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cache_client.prewarm.pipeline import Request, check_list
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.support import silent_store, site, topo
from xdc.config import XdcConfig, load_config

pytestmark = pytest.mark.both_backends(postgres="stress")

SRC, DST = "idca-drive", "idcb-drive"
DAG_IDS = {"xdc_mirror", "xdc_resize", "xdc_prewarm", "xdc_free", "xdc_lag_monitor", "xdc_verify"}


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


@pytest.mark.both_backends  # on PostgreSQL in CI too (the module's other tests: with --stress)
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


def test_verify_dag_finds_and_repairs_drift(run_dag: Callable[..., Any], dag_xcom: Callable[..., Any],
                                           config_writer: Callable[..., Path], file_maker: Callable[..., dict[str, bytes]],
                                           xcfg: XdcConfig, tmp_path: Path, tag: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.mirror.chaos_support import variant

    routes = [r.model_dump() for r in xcfg.routes]
    for r in routes:  # this test's keys only: the buckets are shared with the other tests
        r["source"]["prefix"] += f"{tag}/"
        r["target"]["prefix"] += f"{tag}/"
    cfg = variant(xcfg, {"routes": routes})
    monkeypatch.setenv("XDC_CONFIG", str(config_writer(cfg, tmp_path / "xdc.yaml", tag)))
    files = file_maker(tmp_path / "src", tag, 3)
    ingest(site(cfg, "A"), tmp_path / "src", SRC, "camera/")
    with Mirror(topo(cfg, "B"), group_id=f"{tag}-mirror.B") as m:
        assert m.run(once=True).applied == 3
    gone = sorted(files)[1]
    silent_store(cfg, "B").delete(DST, gone)  # out of band: no event

    run = run_dag("xdc_verify")
    assert run.state == "success"
    assert dag_xcom(run, "report") == {
        "camera": {"drift": 1, "missing": 1, "extra": 0, "differ": 0, "matched": 2, "repaired": 1},
        "lidar": {"drift": 0, "missing": 0, "extra": 0, "differ": 0, "matched": 0, "repaired": 0}}
    with Mirror(topo(cfg, "B"), group_id=f"{tag}-mirror.B") as m:
        assert m.run(once=True).applied == 1  # the repair, through the normal path
    assert site(cfg, "B").store.get(DST, gone) == files[gone]
    run = run_dag("xdc_verify", conf={"repair": False})
    assert dag_xcom(run, "report")["camera"]["drift"] == 0
    assert site(cfg, "B").state.verify.latest()["camera"]["trigger"] == "schedule"


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
    shards = 1 if xcfg.dc("A").state_url.startswith("sqlite") else 2  # SQLite state takes one resize process
    assert total["shards"] == shards and total["results"].get("resized") == 2
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
    for dc in ("A", "B"):  # the version became ready in each: one asset event each, for training DAGs
        (extra,) = ready_events(f"ds-{tag}", dc)
        assert (extra["version"], extra["files"], extra["bytes"], extra["cached_ratio"]) == ("v1", 5, 5 * 40_000, 1.0)

    # Released again: nothing left to load, the warm step maps over nothing and is skipped.
    run = run_dag("xdc_prewarm", conf=conf)
    assert run.state == "success"
    assert all(p["plan"]["warm_files"] == 0 and p["plan"]["cached_files"] == 5 for p in mapped_xcoms(run, "plan"))
    assert run.get_task_instance("warm").state == "skipped"
    assert all(r["complete"] for r in dag_xcom(run, "report"))
    assert all(len(ready_events(f"ds-{tag}", dc)) == 1 for dc in ("A", "B"))  # still ready: not announced again

    run = run_dag("xdc_free", conf={"dataset": f"ds-{tag}", "datacenters": ["A", "B"]})
    assert run.state == "success"
    for dc in ("A", "B"):
        check = check_list(site(cfg, dc), Request(str(listing)))
        assert check.counts["not_cached"] == 5 and check.bytes_cached == 0, check.summary()
    freed = dag_xcom(run, "report")
    assert {r["dc"] for r in freed} == {"A", "B"} and all(r["complete"] for r in freed)


def test_prewarm_dag_takes_a_release_the_watcher_lost(run_dag: Callable[..., Any], dag_xcom: Callable[..., Any],
                                                     config_writer: Callable[..., Path],
                                                     file_maker: Callable[..., dict[str, bytes]], xcfg: XdcConfig,
                                                     tmp_path: Path, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release on Kafka that no run took (the watcher committed its offset, then died before the
    asset event was stored): the scheduled run's reconcile task finds it without a result in B and
    the run warms it; the next run finds the result in B's ledger and does nothing."""
    import time

    from cache_client.prewarm.release import publish_release
    from xdc.events import ReleaseEvent

    path = config_writer(xcfg, tmp_path / "xdc.yaml", tag, prewarm={"reconcile_after_seconds": 0})
    monkeypatch.setenv("XDC_CONFIG", str(path))
    files = file_maker(tmp_path / "src", tag, 3)
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, "camera/")
    with Mirror(topo(xcfg, "B"), group_id=f"{tag}-lib-mirror") as m:
        assert m.run(once=True).applied == 3
    listing = tmp_path / "release.txt"
    listing.write_text("".join(f"{SRC}/{k}\n" for k in files))
    publish_release(site(xcfg, "A"), ReleaseEvent(f"lost-{tag}", "v1", str(listing), time.time(), ("B",)))

    run = run_dag("xdc_prewarm")  # as the 10-minute schedule starts it: no asset event, no params
    assert run.state == "success"
    owed = dag_xcom(run, "reconcile")
    assert [(u["release"]["dataset"], u["dc"]) for u in owed] == [(f"lost-{tag}", "B")]
    assert [(r["dc"], r["dataset"], r["complete"]) for r in dag_xcom(run, "report")] == [("B", f"lost-{tag}", True)]
    assert check_list(site(xcfg, "B"), Request(str(listing))).cached_ratio == 1.0
    entry = site(xcfg, "B").state.releases.get(f"lost-{tag}", "v1")
    assert entry is not None and entry.state == "warm" and entry.origin.startswith("A:")
    again = run_dag("xdc_prewarm")
    assert again.state == "success" and dag_xcom(again, "reconcile") == []


def test_prewarm_emits_fluid_dataloads_where_fluid_runs_the_cache(
        run_dag: Callable[..., Any], dag_xcom: Callable[..., Any], config_file: Path,
        file_maker: Callable[..., dict[str, bytes]], xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    """B's cache is run by Fluid (cache.mode: fluid): the DAG warms A itself and writes B's list as
    DataLoads into B's store, valid against Fluid's CRD, each file once; B's cache is left alone."""
    from tests.fluid_crd import validate

    files = file_maker(tmp_path / "src", tag, 3)
    ingest(site(xcfg, "A"), tmp_path / "src", SRC, "camera/")
    with Mirror(topo(xcfg, "B"), group_id=f"{tag}-lib-mirror") as m:
        assert m.run(once=True).applied == 3
    listing = tmp_path / "release.txt"
    listing.write_text("".join(f"{SRC}/{k}\n" for k in files))
    data = yaml.safe_load(config_file.read_text())
    data["datacenters"]["B"]["cache"] |= {"mode": "fluid", "fluid": {
        "dataset": "drive-b", "namespace": "training", "output": f"s3://{DST}/fluid/{tag}/"}}
    config_file.write_text(yaml.safe_dump(data))
    cfg = load_config(config_file)

    run = run_dag("xdc_prewarm", conf={"dataset": f"ds-{tag}", "version": "v1", "manifest": str(listing),
                                       "datacenters": ["A", "B"]})
    assert run.state == "success"
    assert [p["unit"]["dc"] for p in mapped_xcoms(run, "plan")] == ["A"]  # only A is planned and warmed
    (emitted,) = mapped_xcoms(run, "emit")
    assert emitted["dc"] == "B" and emitted["files"] == 3 and emitted["bytes"] == sum(len(b) for b in files.values())
    key = f"fluid/{tag}/xdc-ds-{tag}-v1-b.yaml"
    assert emitted["uri"] == f"s3://{DST}/{key}"
    docs = list(yaml.safe_load_all(site(cfg, "B").store.get(DST, key)))
    for d in docs:
        validate(d)
    assert sorted(t["path"] for d in docs for t in d["spec"]["target"]) == sorted(f"/{DST}/{k}" for k in files)
    assert {(d["spec"]["dataset"]["name"], d["metadata"]["namespace"]) for d in docs} == {("drive-b", "training")}
    report = dag_xcom(run, "report")
    assert {(r["dc"], r["complete"], r.get("mode")) for r in report} == {("A", True, None), ("B", True, "fluid")}
    assert check_list(site(cfg, "A"), Request(str(listing))).complete
    assert check_list(site(cfg, "B"), Request(str(listing))).counts["not_cached"] == 3  # Fluid's job, not ours


def ready_events(dataset: str, dc: str) -> list[dict[str, Any]]:
    """The extras of the asset events `xdc-ready-<dataset>-<dc>` got, in the in-process Airflow's DB."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from xdc.app.airflow_support import ready_asset_name

    with create_session() as session:
        rows = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                               .where(AssetModel.name == ready_asset_name(dataset, dc)).order_by(AssetEvent.id)).all()
        return [dict(r.extra or {}) for r in rows]


def test_prewarm_dag_params_select_and_root_on_an_index(run_dag: Callable[..., Any], config_file: Path,
                                                        xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    """The DAG's params `select` and `root` on an mmdet3d v1 index kept in S3: only the selected
    camera frames are warmed, in both datacenters (the index is read from each one's own store)."""
    import pickle

    from tests.cache_client.indexes import nuscenes_v1_infos, under

    doc, placed = nuscenes_v1_infos(2, sweeps=1)  # paths "./data/nuscenes/<dir>/<name>"
    src = tmp_path / "src"
    for d, names in placed.items():
        for name in names:
            p = src / "data" / "nuscenes" / d / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(name.encode() * 300)
    (src / "infos_train.pkl").write_bytes(pickle.dumps(doc, protocol=4))
    ingest(site(xcfg, "A"), src, SRC, f"camera/{tag}/")
    with Mirror(topo(xcfg, "B"), group_id=f"{tag}-lib-mirror") as m:
        m.run(once=True)
    root, select = f"s3://{SRC}/camera/{tag}", "infos[].cams.*.data_path"
    index = f"{root}/infos_train.pkl"
    cfg = load_config(config_file)

    run = run_dag("xdc_prewarm", conf={"dataset": f"nusc-{tag}", "version": "v1", "manifest": index,
                                       "select": select, "root": root, "datacenters": ["A", "B"]})
    assert run.state == "success"
    cams = [d for d in placed if d.startswith("samples/CAM")]
    lidar = tmp_path / "lidar.txt"
    lidar.write_text("".join(k + "\n" for k in under(f"{SRC}/camera/{tag}/data/nuscenes", placed,
                                                    ["samples/LIDAR_TOP", "sweeps/LIDAR_TOP"])))
    for dc in ("A", "B"):
        check = check_list(site(cfg, dc), Request(index, select=select, root=root))
        assert check.complete and len(check.files) == len(under("x", placed, cams)) == 12, check.summary()
        assert check_list(site(cfg, dc), Request(str(lidar))).bytes_cached == 0  # not selected: not warmed
        assert ready_events(f"nusc-{tag}", dc)[0]["files"] == 12


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
    from xdc.app.airflow_tasks import (
        prewarm_units,
        release_from_params,
        units_in_mode,
        warm_jobs,
    )
    from xdc.errors import ConfigError, EventError

    cfg = two_dc_config(tmp_path)
    manual = release_from_params({"dataset": "ds", "version": "v1", "manifest": "/l.txt", "datacenters": ["B"]})
    assert manual is not None and release_from_params({"dataset": "ds"}) is None
    indexed = release_from_params({"dataset": "ds", "version": "v1", "manifest": "/i.pkl", "select": "infos[].lidar_path",
                                   "root": {"": "s3://b/p", "pts": "lidar"}, "make_room": True})
    assert indexed is not None and (indexed["select"], indexed["root"]["pts"], indexed["make_room"]) == (
        "infos[].lidar_path", "lidar", True)
    with pytest.raises(EventError):
        release_from_params({"dataset": "ds", "manifest": "/i.pkl", "root": ["s3://b"]})
    every = dict(manual, datacenters=[])  # no datacenters named: every DC with a cache
    units = prewarm_units(cfg, [manual, every])
    assert [(u["release"]["datacenters"], u["dc"]) for u in units] == [(["B"], "B"), ([], "A"), ([], "B"), ([], "C")]
    with pytest.raises(ConfigError):
        prewarm_units(cfg, [dict(manual, datacenters=["Z"])])
    assert {u["mode"] for u in units} == {"warm"}
    assert units_in_mode([units[0], units[1] | {"mode": "fluid"}], "fluid") == [units[1] | {"mode": "fluid"}]
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
    emitted = {"dc": "C", "dataset": "ds", "version": "1", "files": 2, "dataloads": ["xdc-ds-1-c"], "uri": "s3://b/k",
               "summary": "s", "rejected_count": 0, "rejected": []}
    assert prewarm_outcome([], [emitted]) == [{"dc": "C", "dataset": "ds", "version": "1", "complete": True,
                                               "mode": "fluid", "files": 2, "dataloads": ["xdc-ds-1-c"],
                                               "uri": "s3://b/k", "summary": "s"}]
    with pytest.raises(CacheError, match=r"ds@1 in C: 1 list entries not in any DataLoad, e.g. line 3 \(no route"):
        prewarm_outcome([], [emitted | {"rejected_count": 1, "rejected": [["line 3", "no route for x/y"]]}])
    with pytest.raises(CacheError, match="still cached"):
        free_outcome([{"dc": "B", "complete": False, "left_bytes": {"n1": 9}}])

    shards = [{"frames": 2, "bytes_in": 10, "bytes_out": 2, "results": {"resized": 2}},
              {"frames": 1, "bytes_in": 0, "bytes_out": 0, "results": {"done_before": 1}}]
    assert sum_resize_stats(shards) == {"shards": 2, "frames": 3, "bytes_in": 10, "bytes_out": 2,
                                        "results": {"resized": 2, "done_before": 1}, "ratio": 5.0}
