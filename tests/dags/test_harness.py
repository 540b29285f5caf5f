"""The Airflow harness itself: dag.test() in process, and real Airflow processes with a Kafka
AssetWatcher fed by a real Apache Kafka broker that takes only SASL_SSL (the release-event path
of the prewarm DAG, with the connection settings the project builds)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.airflow_local import running_airflow
from xdc.app.airflow_support import kafka_connection_env
from xdc.config import Brokers
from xdc.io.kafka import ensure_topics, make_producer

RELEASE = {"type": "dataset.released", "dataset": "cams-2026", "version": "v3",
           "manifest": "s3://releases/cams-2026/v3/files.txt", "time": "2026-11-23T10:00:00Z",
           "datacenters": ["idc-a", "idc-b"]}


def test_dag_test_reads_config_path_and_pushes_xcom(run_dag: Any, dag_xcom: Any, fixture_dags: Path,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "xdc.yaml"
    monkeypatch.setenv("XDC_CONFIG", str(cfg))
    run = run_dag("xdc_probe_config", conf={"release": RELEASE}, folder=fixture_dags)
    assert run.state == "success"
    assert dag_xcom(run, "read_config_path") == str(cfg)
    assert dag_xcom(run, "releases") == [RELEASE]


def test_airflow_variable_wins_over_env(run_dag: Any, dag_xcom: Any, fixture_dags: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.models import Variable

    monkeypatch.setenv("XDC_CONFIG", "/from/env.yaml")
    Variable.set("xdc_config", "/from/variable.yaml")
    try:
        run = run_dag("xdc_probe_config", folder=fixture_dags)
        assert dag_xcom(run, "read_config_path") == "/from/variable.yaml"
    finally:
        Variable.delete("xdc_config")


def test_project_dags_import_cleanly(airflow_home: Path) -> None:
    """Every DAG file dropped into dags/ must parse (DagBag import errors fail here)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    assert not bag.import_errors, bag.import_errors


def _produce(brokers: Brokers, topic: str, values: list[bytes]) -> None:
    producer = make_producer(brokers)
    try:
        for v in values:
            producer.send(topic, v)
        producer.flush(timeout=15)
    finally:
        producer.close(timeout=5)


@pytest.mark.slow
def test_release_event_on_kafka_starts_dag_run(tmp_path: Path, fixture_dags: Path, secure_kafka: Brokers,
                                                airflow_db: str) -> None:
    """Release on Kafka -> AssetWatcher (triggerer) -> asset event -> scheduler runs the DAG -> the
    task gets the payload. Then a burst of two releases: the watcher restarts and resumes after
    each event, and every release reaches exactly one run (one run may carry several)."""
    topic, dag_id = "xdc.releases.probe", "xdc_probe_release"
    burst = [RELEASE | {"version": "v4"}, RELEASE | {"version": "v5"}]
    t0 = time.monotonic()
    brokers = secure_kafka
    # The topic must exist before the watcher subscribes: on an unknown topic the trigger
    # fails and the triggerer restarts it in a loop. One partition keeps noise before release.
    ensure_topics(brokers, [topic], partitions=1)
    conn_name, conn_value = kafka_connection_env("xdc_kafka", brokers, f"airflow-{tmp_path.name}")
    assert json.loads(conn_value)["extra"]["security.protocol"] == "SASL_SSL"
    env = {conn_name: conn_value, "XDC_PROBE_RELEASE_TOPIC": topic, "XDC_CONFIG": "/etc/xdc-probe.yaml"}
    with running_airflow(tmp_path / "airflow", fixture_dags, extra_env=env, database_url=airflow_db) as af:
        started_s, pss = af.started_s, af.pss_mb()
        af.wait_dag(dag_id)
        af.wait_dag("xdc_probe_config")
        manual = af.trigger_dag("xdc_probe_config", conf={"release": RELEASE})  # over REST
        # Noise first: the watcher must skip it and still fire on the release behind it.
        _produce(brokers, topic, [b"not json", json.dumps({"type": "other"}).encode(),
                                    json.dumps(RELEASE | {"version": ""}).encode(),  # invalid release
                                    json.dumps(RELEASE).encode()])
        t_sent = time.monotonic()
        first = af.wait_run(dag_id, af.wait_new_run(dag_id)["dag_run_id"])
        first_s = time.monotonic() - t_sent
        _produce(brokers, topic, [json.dumps(r).encode() for r in burst])
        t_sent = time.monotonic()
        burst_got: dict[str, list[dict[str, Any]]] = {}  # run id -> releases its task saw

        def burst_done() -> bool:
            for run in af.list_runs(dag_id):
                rid = run["dag_run_id"]
                if rid != first["dag_run_id"] and rid not in burst_got and run["state"] == "success":
                    burst_got[rid] = af.xcom(dag_id, rid, "releases")
            return sum(len(v) for v in burst_got.values()) >= len(burst)
        af.wait_for("both burst releases run", burst_done, timeout=120)
        burst_s = time.monotonic() - t_sent
        runs = af.list_runs(dag_id)
        manual_done = af.wait_run("xdc_probe_config", manual["dag_run_id"])
        manual_xcoms = [af.xcom("xdc_probe_config", manual["dag_run_id"], t)
                        for t in ("read_config_path", "releases")]
        got_first = af.xcom(dag_id, first["dag_run_id"], "releases")
        pss_end = af.pss_mb()
    assert manual_done["state"] == "success" and manual_done["run_type"] == "manual"
    assert manual_xcoms == ["/etc/xdc-probe.yaml", [RELEASE]]
    assert first["state"] == "success"
    assert {r["run_type"] for r in runs} == {"asset_triggered"} and len(runs) == 1 + len(burst_got)
    assert len(got_first) == 1 and {k: got_first[0][k] for k in RELEASE} == RELEASE
    assert got_first[0]["source"] == {"topic": topic, "partition": 0, "offset": 3}
    seen = sorted((g for gs in burst_got.values() for g in gs), key=lambda g: g["source"]["offset"])
    assert [{k: g[k] for k in RELEASE} for g in seen] == burst
    assert [g["source"]["offset"] for g in seen] == [4, 5]
    # the connection carries the SASL password: no Airflow log (components, tasks, triggerer) may
    password = os.environ["XDC_HARNESS_KAFKA_PASSWORD"]
    logs = [p for p in (tmp_path / "airflow").rglob("*") if p.is_file() and p.suffix in (".log", ".json", "")]
    assert any(p.name == "triggerer.log" for p in logs)
    for p in logs:
        assert password not in p.read_text(errors="replace"), f"the Kafka password leaked into {p}"
    print(f"\nairflow healthy after {started_s:.1f}s; PSS {pss:.0f} MiB at start, {pss_end:.0f} MiB at end; "
          f"release -> run done {first_s:.1f}s; burst of 2 -> {len(burst_got)} run(s) done {burst_s:.1f}s; "
          f"test wall {time.monotonic() - t0:.1f}s")
