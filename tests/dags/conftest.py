"""Fixtures for DAG tests: an in-process Airflow on SQLite, dag.test(), and a Kafka broker.

Airflow reads AIRFLOW_HOME and its config once, at first import, so the environment is set when
this conftest is imported (collection time), before any test module imports airflow. A DAG test
only needs the `airflow_home` fixture (or `run_dag`, which uses it).
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools import postgres
from devtools.airflow_local import airflow_env, running_kafka
from devtools.kafka_broker import SecureListener
from tests.support import make_tls
from xdc.config import Brokers, KafkaSecurity, SaslCredentials
from xdc.io.state import sqlite_path

ROOT = Path(__file__).resolve().parents[2]
PROJECT_DAGS = ROOT / "dags"
FIXTURE_DAGS = Path(__file__).resolve().parent / "fixture_dags"

_HOME = Path(tempfile.mkdtemp(prefix="xdc-airflow-home-"))
atexit.register(shutil.rmtree, _HOME, True)
if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(_HOME):
    # Too late to point Airflow at a temp home: it would use (and write) ~/airflow.
    raise RuntimeError("airflow was imported before tests/dags/conftest.py could set AIRFLOW_HOME")
# dag.test() serialises a DAG only from a configured bundle: the project's dags/ is the default
# "dags-folder" bundle, the probe DAGs are a second one.
_BUNDLES = [{"name": name, "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(path), "refresh_interval": 0}}
            for name, path in (("dags-folder", PROJECT_DAGS), ("xdc-fixtures", FIXTURE_DAGS))]
os.environ.update(airflow_env(_HOME, PROJECT_DAGS,
                              extra={"AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(_BUNDLES)}))


@pytest.fixture
def airflow_db(pg_port: int, tag: str) -> str:
    """An empty PostgreSQL database for one test's real Airflow (its metadata database)."""
    name = f"airflow_{tag}"
    postgres.create_database(pg_port, name)
    return postgres.url(pg_port, name)


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    """A fresh Airflow metadata DB (SQLite) in a temp AIRFLOW_HOME; removed at the end."""
    from airflow.utils.db import resetdb

    resetdb()
    return _HOME


def load_dag(dag_id: str, folder: Path = PROJECT_DAGS) -> Any:
    """The DAG `dag_id` parsed from `folder` (the project's dags/ by default); fail on import errors."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    assert dag_id in bag.dags, f"{dag_id} not in {sorted(bag.dags)}"
    return bag.dags[dag_id]


def _xcom_of(dag_run: Any, task_id: str, key: str = "return_value") -> Any:
    """The XCom a task of a finished dag.test() run pushed (deserialised)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=task_id, key=key)
        ).first()
        assert row is not None, f"no XCom {key!r} from {dag_run.dag_id}.{task_id}"
        return XComModel.deserialize_value(row)


@pytest.fixture
def dag_xcom(airflow_home: Path) -> Callable[..., Any]:
    """dag_xcom(dag_run, task_id, key="return_value") -> the XCom of a finished dag.test() run."""
    return _xcom_of


@pytest.fixture(scope="session")
def fixture_dags() -> Path:
    """The probe DAGs (tests/dags/fixture_dags): the second bundle of the in-process Airflow."""
    return FIXTURE_DAGS


@pytest.fixture
def run_dag(airflow_home: Path) -> Callable[..., Any]:
    """run_dag(dag_id, conf=None, folder=PROJECT_DAGS) -> DagRun, via dag.test() in this process."""

    def _run(dag_id: str, conf: dict[str, Any] | None = None, folder: Path = PROJECT_DAGS) -> Any:
        dag = load_dag(dag_id, folder)
        return dag.test(run_conf=conf or {})

    return _run


@pytest.fixture
def secure_kafka(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Brokers]:
    """An Apache Kafka broker of its own that takes only SASL_SSL (SCRAM-SHA-256, a test CA), on free
    ports; yields the client's view of it (addresses + security, the password in the environment).

    Swap for the session stacks of tests/conftest.py (xcfg, secure_cfg) when a test needs more.
    """
    tls = make_tls(tmp_path / "tls")
    user, password = "harness", secrets.token_urlsafe(18)
    monkeypatch.setenv("XDC_HARNESS_KAFKA_USER", user)
    monkeypatch.setenv("XDC_HARNESS_KAFKA_PASSWORD", password)
    listener = SecureListener(tls["ca.pem"], tls["broker.crt"], tls["broker.key"], "SCRAM-SHA-256")
    with running_kafka(tmp_path, secure=listener, users={user: password}) as bootstrap:
        yield Brokers((bootstrap,), KafkaSecurity(
            protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", ca_file=tls["ca.pem"],
            sasl_credentials=SaslCredentials(username_env="XDC_HARNESS_KAFKA_USER",
                                             password_env="XDC_HARNESS_KAFKA_PASSWORD")))


# -- the project's DAGs against the real stack (tests/conftest.py's xcfg) ---------------------------
def write_xdc_config(xcfg: Any, path: Path, tag: str, **over: dict[str, Any]) -> Path:
    """An XdcConfig as a YAML file the DAGs load (XDC_CONFIG): absolute state paths, the test's
    own consumer groups, a short ready gate. `over`: top-level sections to update (lag={...})."""
    import yaml

    data = xcfg.model_dump(mode="json", exclude={"base_dir"})
    for dc in data["datacenters"]:
        url = xcfg.dc(dc).state_url
        if url.startswith("sqlite:///"):
            data["datacenters"][dc]["state_url"] = f"sqlite:///{sqlite_path(url, xcfg.base_dir).resolve()}"
    data["mirror"]["group_id"] = f"{tag}-mirror"
    if data.get("resize"):
        data["resize"]["group_id"] = f"{tag}-resize"
    data["prewarm"] |= {"group_id": f"{tag}-prewarm", "ready_timeout_seconds": 30, "ready_poll_seconds": 0.5}
    for section, values in over.items():
        data[section] = (data.get(section) or {}) | values
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_files(root: Path, tag: str, n: int, size: int = 40_000) -> dict[str, bytes]:
    """n random files under root/tag/ -> {their key once ingested under "camera/": bytes}."""
    out = {}
    for i in range(n):
        data = os.urandom(size)
        p = root / tag / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[f"camera/{tag}/f{i}.bin"] = data
    return out


@pytest.fixture
def config_writer() -> Callable[..., Path]:
    """write_xdc_config as a fixture (test modules here are not a package: no imports between them)."""
    return write_xdc_config


@pytest.fixture
def file_maker() -> Callable[..., dict[str, bytes]]:
    """make_files as a fixture."""
    return make_files
