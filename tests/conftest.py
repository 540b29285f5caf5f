"""Shared fixtures: one local two-datacenter stack of real servers per test session.

The stack is the same code as `xdc stack up`. Each test gets its own topics, consumer groups and
state (`xcfg`): SQLite files of its own, or, in modules marked `both_backends`, a second run on
PostgreSQL with a schema per datacenter of its own; so tests never see each other's events while
the servers are started once.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import postgres, stack
from devtools.procs import stop_proc
from tests.support import close_open_topologies
from xdc.config import XdcConfig, parse_config
from xdc.io.kafka import ensure_topics

PG_DATABASE = "xdc_tests"

OUT = Path(__file__).resolve().parent.parent / "test-output"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress", action="store_true", help="run long fault-injection tests at full size")


SERVER_FIXTURES = {"stack_cfg", "pg_port", "jfs_cache", "airflow_home"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_backends: run each test on SQLite and on PostgreSQL state")
    config.addinivalue_line("markers", "servers: needs real servers (`make test-fast` leaves these out)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "state_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_backends"):
        metafunc.parametrize("state_backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.servers)],
                             indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


@pytest.fixture
def state_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="session")
def pg_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A PostgreSQL server (Debian's binaries) for the session; each test gets schemas of its own."""
    proc = postgres.start_postgres(tmp_path_factory.mktemp("pg"))
    try:
        assert proc.port
        postgres.create_database(proc.port, PG_DATABASE)
        yield proc.port
    finally:
        stop_proc(proc)


@pytest.fixture(autouse=True)
def _close_topologies() -> Iterator[None]:
    yield
    close_open_topologies()


@pytest.fixture(scope="session")
def test_output() -> Path:
    OUT.mkdir(exist_ok=True)
    return OUT


@pytest.fixture(scope="session")
def stack_cfg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdcConfig]:
    run = tmp_path_factory.mktemp("stack")
    try:
        yield stack.up(run, nodes=2, cache_size_mib=256)
    finally:
        stack.down(run)


@pytest.fixture
def tag() -> str:
    return "t" + uuid.uuid4().hex[:10]


def isolated(cfg: XdcConfig, tag: str, *, pg_port: int | None = None) -> XdcConfig:
    """The stack's config with topics, consumer groups and state of this test's own (SQLite files,
    or with `pg_port` a PostgreSQL schema per datacenter)."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    data["mirror"]["group_id"] = f"{tag}-mirror"
    data["prewarm"]["group_id"] = f"{tag}-prewarm"
    if data.get("resize"):
        data["resize"]["group_id"] = f"{tag}-resize"
    for dc, d in data["datacenters"].items():
        d["kafka"]["topics"] = {"events": f"{tag}.events", "applied": f"{tag}.applied",
                                "releases": f"{tag}.releases", "dead_letter": f"{tag}.dlq"}
        if pg_port is None:
            d["state_url"] = f"sqlite:///{tag}/{dc}-state.db"
        else:
            schema = f"{tag}_{dc}".lower()
            postgres.create_schema(pg_port, PG_DATABASE, schema)
            d["state_url"] = postgres.url(pg_port, PG_DATABASE, schema=schema)
    new = parse_config(data, base_dir=cfg.base_dir)
    for dc in new.datacenters:
        k = new.dc(dc).kafka
        ensure_topics(k.bootstrap_servers, list(k.topics.model_dump().values()), k.partitions)
    return new


@pytest.fixture
def xcfg(stack_cfg: XdcConfig, tag: str, state_backend: str, request: pytest.FixtureRequest) -> XdcConfig:
    pg = request.getfixturevalue("pg_port") if state_backend == "postgres" else None
    return isolated(stack_cfg, tag, pg_port=pg)
