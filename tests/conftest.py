"""Shared fixtures: one local two-datacenter stack of real servers per test session.

The stack is the same code as `xdc stack up`. Each test gets its own topics, consumer groups and
state (`xcfg`): SQLite files of its own, or, in modules marked `both_backends`, a second run on
PostgreSQL with a schema per datacenter of its own; so tests never see each other's events while
the servers are started once.

Cache backends: a test that takes `cache_backend` runs once per backend, "juicefs" and "alluxio".
The Alluxio runs share one more stack (`stack.up(cache="alluxio")`: an Alluxio cluster per
datacenter), started only when such a test runs and stopped once the session's Alluxio tests are
done (the parameter is session-scoped, so pytest runs them together). `XDC_TEST_ALLUXIO_STACK=DIR`
reuses (and leaves running) a stack started there before, to save its start-up while editing.
"""
from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadFileScheduling

from devtools import postgres, stack
from devtools.kafka_broker import SecureListener
from devtools.notifying_proxy import NotifyingProxy
from devtools.procs import stop_proc
from tests.support import close_open_topologies, make_tls, restore_env
from xdc.config import XdcConfig, parse_config
from xdc.io.kafka import ensure_topics
from xdc.topology import Topology

PG_DATABASE = "xdc_tests"

OUT = Path(__file__).resolve().parent.parent / "test-output"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress", action="store_true",
                     help="the full run: long fault-injection tests at full size, and every both_backends test "
                          "on PostgreSQL too (CI runs those marked postgres='stress' on SQLite only)")


SERVER_FIXTURES = {"stack_cfg", "pg_port", "jfs_cache", "airflow_home", "cache_backend", "alx", "secure_kafka",
                   "secure_stack", "wan_stack", "own_stack"}
CACHE_BACKENDS = ("juicefs", "alluxio")
ALLUXIO_WORKER_MIB = 64  # storage per worker of the test stack's Alluxio
ALLUXIO_BLOCK_MIB = 1  # so a few MiB make a file of several blocks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_backends(postgres='always'|'stress'): run each test on SQLite and on "
                                       "PostgreSQL state; with postgres='stress' the PostgreSQL run only with --stress")
    config.addinivalue_line("markers", "servers: needs real servers (`make test-fast` leaves these out)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("both_backends")
    if "state_backend" not in metafunc.fixturenames or marker is None:
        return
    # The state SQL is tested on both backends by tests/xdc/io/; a flow's tests add little on the
    # second one but their run time, so modules may keep their PostgreSQL run for --stress.
    if marker.kwargs.get("postgres", "always") == "stress" and not metafunc.config.getoption("--stress"):
        metafunc.parametrize("state_backend", ["sqlite"], indirect=True)
        return
    metafunc.parametrize("state_backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.servers)],
                         indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


ALLUXIO_PARAM = re.compile(r"\[(?:[^\]]*-)?alluxio(?:-[^\]]*)?\]$")


# Modules of one or two tests that run for minutes: handed out first (longest first), so that the
# run does not end with one worker on a long test and the other idle. Others go by test count.
LONG_MODULES = ("tests/dags/test_e2e_ready.py", "tests/mirror/test_wan.py", "tests/dags/test_e2e_release.py",
                "tests/dags/test_harness.py", "tests/devtools/test_demo.py", "tests/xdc/test_secrets.py")


class ModuleScheduling(LoadFileScheduling):
    """`--dist loadfile` (a module's tests on one worker, so module fixtures start once) where every
    module with tests on the Alluxio stack is one unit: that session stack takes ~60 s to start."""

    _alluxio: set[str] | None = None

    def _assign_work_unit(self, node: Any) -> None:
        for scope in reversed(LONG_MODULES):
            if scope in self.workqueue:
                self.workqueue.move_to_end(scope, last=False)
        super()._assign_work_unit(node)

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        if self._alluxio is None:  # the whole collection is known before the first split
            self._alluxio = {n.split("::", 1)[0] for n in self.collection or () if ALLUXIO_PARAM.search(n)}
        return "alluxio-stack" if module in self._alluxio else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> ModuleScheduling | None:
    return ModuleScheduling(config, log) if config.getvalue("dist") == "loadfile" else None


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
    while _PROXIES:
        _PROXIES.pop().stop()


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


# -- a cache backend per run: JuiceFS (the session stack's) or Alluxio (a stack of its own) -----------
@dataclass
class BackendStack:
    name: str  # "juicefs" or "alluxio"
    run: Path | None = None  # the Alluxio stack's run dir
    cfg: XdcConfig | None = None  # the Alluxio stack's config
    creds: dict[str, str] | None = None  # its generated secrets: set them only while a test runs


@pytest.fixture(scope="session", params=CACHE_BACKENDS)
def cache_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendStack]:
    """The cache backend of this run. For "alluxio", the two-datacenter stack with an Alluxio cluster
    as each datacenter's cache (two workers of ALLUXIO_WORKER_MIB, ALLUXIO_BLOCK_MIB blocks)."""
    if request.param == "juicefs":
        yield BackendStack("juicefs")
        return
    reuse = os.environ.get("XDC_TEST_ALLUXIO_STACK")
    run = Path(reuse) if reuse else tmp_path_factory.mktemp("alluxio-stack")
    names = [f"XDC_{dc}_{k}" for dc in stack.DEFAULT_DCS for k in ("ACCESS_KEY", "SECRET_KEY")]
    saved = {k: os.environ.get(k) for k in names}
    try:
        cfg = stack.up(run, nodes=2, cache_size_mib=ALLUXIO_WORKER_MIB, cache="alluxio",
                       alluxio_block_mib=ALLUXIO_BLOCK_MIB)
        creds = {k: os.environ[k] for k in names}
        restore_env(saved)
        yield BackendStack("alluxio", run, cfg, creds)
    finally:
        restore_env(saved)
        if not reuse:
            stack.down(run)


@pytest.fixture
def backend_stack_cfg(cache_backend: BackendStack, request: pytest.FixtureRequest,
                      monkeypatch: pytest.MonkeyPatch) -> XdcConfig:
    """The two-datacenter stack whose caches are `cache_backend`'s (its secrets in the environment)."""
    if cache_backend.cfg is None:
        return request.getfixturevalue("stack_cfg")  # type: ignore[no-any-return]
    for k, v in (cache_backend.creds or {}).items():
        monkeypatch.setenv(k, v)
    return cache_backend.cfg


@pytest.fixture
def cache_xcfg(backend_stack_cfg: XdcConfig, tag: str, state_backend: str, request: pytest.FixtureRequest) -> XdcConfig:
    """`xcfg` on the stack of this run's cache backend."""
    pg = request.getfixturevalue("pg_port") if state_backend == "postgres" else None
    return isolated(backend_stack_cfg, tag, pg_port=pg)


@pytest.fixture
def tag() -> str:
    return "t" + uuid.uuid4().hex[:10]


_PROXIES: list[NotifyingProxy] = []  # stopped after each test by _close_topologies


def isolated(cfg: XdcConfig, tag: str, *, pg_port: int | None = None) -> XdcConfig:
    """The stack's config with topics, consumer groups and state of this test's own (SQLite files,
    or with `pg_port` a PostgreSQL schema per datacenter), and S3 endpoints that announce every
    write on this test's events topics: a notifying proxy per datacenter in front of the stack's
    gateway (as the stack's own proxies do for its topics)."""
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
        ensure_topics(Topology(new, dc).here.brokers, list(k.topics.model_dump().values()), k.partitions)
    for dc, d in data["datacenters"].items():
        s3 = new.dc(dc).s3
        proxy = NotifyingProxy(stack.gateway_url(cfg.base_dir, dc), Topology(new, dc).here.brokers,
                               new.dc(dc).kafka.topics.events, credentials=s3.credentials.resolve(),
                               region=s3.region).start()
        _PROXIES.append(proxy)
        d["s3"].update(internal_url=proxy.url, external_url=proxy.url, notifications=True)
    return parse_config(data, base_dir=cfg.base_dir)


@pytest.fixture
def xcfg(stack_cfg: XdcConfig, tag: str, state_backend: str, request: pytest.FixtureRequest) -> XdcConfig:
    pg = request.getfixturevalue("pg_port") if state_backend == "postgres" else None
    return isolated(stack_cfg, tag, pg_port=pg)


# -- a stack whose brokers require TLS + SASL --------------------------------------------------------
@dataclass
class SecureStack:
    run: Path
    cfg: XdcConfig
    creds: dict[str, str]  # the generated secrets (env var name -> value): set them only while a test runs
    tls: dict[str, Path]  # make_tls files


@pytest.fixture(scope="session")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    """Two datacenters whose brokers listen with SASL_SSL only: A with SCRAM-SHA-512, B with PLAIN and
    client certificates (mTLS). Certificates from a test CA (trustme). stack.up puts the stack's
    secrets into os.environ: those of the session stack are put back at once."""
    run = tmp_path_factory.mktemp("secure")
    tls = make_tls(run.parent / (run.name + "-tls"))
    sec = {"A": SecureListener(tls["ca.pem"], tls["broker.crt"], tls["broker.key"], "SCRAM-SHA-512"),
           "B": SecureListener(tls["ca.pem"], tls["broker.crt"], tls["broker.key"], "PLAIN",
                               client_cert_file=tls["client.crt"], client_key_file=tls["client.key"])}
    names = [f"XDC_{dc}_{k}" for dc in ("A", "B") for k in ("ACCESS_KEY", "SECRET_KEY", "KAFKA_USER", "KAFKA_PASSWORD")]
    saved = {k: os.environ.get(k) for k in names}
    try:
        cfg = stack.up(run, nodes=0, kafka_security=sec)
        creds = {k: os.environ[k] for k in names}
        restore_env(saved)
        yield SecureStack(run, cfg, creds, tls)
    finally:
        restore_env(saved)
        stack.down(run)


@pytest.fixture
def secure_cfg(secure_stack: SecureStack, tag: str, monkeypatch: pytest.MonkeyPatch) -> XdcConfig:
    """The secured stack's config with this test's own topics, groups and catalogs; its secrets are in
    the environment for the duration of the test."""
    for k, v in secure_stack.creds.items():
        monkeypatch.setenv(k, v)
    return isolated(secure_stack.cfg, tag)
