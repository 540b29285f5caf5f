"""Shared fixtures: one local two-datacenter stack of real servers per test session.

The stack is the same code as `xdc stack up`. Each test gets its own topics and catalog files
(`xcfg`), so tests never see each other's events, while the servers are started once.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.kafka_broker import SecureListener
from tests.support import make_tls
from xdc import stack
from xdc.config import XdcConfig, parse_config
from xdc.kafka import ensure_topics

OUT = Path(__file__).resolve().parent.parent / "test-output"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress", action="store_true", help="run long fault-injection tests at full size")


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


def isolated(cfg: XdcConfig, tag: str) -> XdcConfig:
    """The stack's config with topics, consumer groups and catalogs of this test's own."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    data["mirror"]["group_id"] = f"{tag}-mirror"
    data["prewarm"]["group_id"] = f"{tag}-prewarm"
    if data.get("resize"):
        data["resize"]["group_id"] = f"{tag}-resize"
    for dc, d in data["datacenters"].items():
        d["kafka"]["topics"] = {"events": f"{tag}.events", "applied": f"{tag}.applied",
                                "releases": f"{tag}.releases", "dead_letter": f"{tag}.dlq"}
        d["catalog_url"] = f"sqlite:///{tag}/{dc}-catalog.db"
    new = parse_config(data, base_dir=cfg.base_dir)
    for dc in new.datacenters:
        k = new.dc(dc).kafka
        ensure_topics(new.brokers(dc), list(k.topics.model_dump().values()), k.partitions)
    return new


@pytest.fixture
def xcfg(stack_cfg: XdcConfig, tag: str) -> XdcConfig:
    return isolated(stack_cfg, tag)


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
        _put_back(saved)
        yield SecureStack(run, cfg, creds, tls)
    finally:
        _put_back(saved)
        stack.down(run)


def _put_back(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def secure_cfg(secure_stack: SecureStack, tag: str, monkeypatch: pytest.MonkeyPatch) -> XdcConfig:
    """The secured stack's config with this test's own topics, groups and catalogs; its secrets are in
    the environment for the duration of the test."""
    for k, v in secure_stack.creds.items():
        monkeypatch.setenv(k, v)
    return isolated(secure_stack.cfg, tag)
