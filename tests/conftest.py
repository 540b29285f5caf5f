"""Shared fixtures: one local two-datacenter stack of real servers per test session.

The stack is the same code as `xdc stack up`. Each test gets its own topics and catalog files
(`xcfg`), so tests never see each other's events, while the servers are started once.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

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
