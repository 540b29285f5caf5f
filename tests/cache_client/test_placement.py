"""Consistent-hash placement of keys on cache nodes (pure logic)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_client.placement import HashRing, place
from xdc.errors import ConfigError

NODES = ["cache-0", "cache-1", "cache-2", "cache-3"]
KEYS = [f"frames/datasets/ds1/cam{i % 7}/frame-{i:06d}.jpg" for i in range(20_000)]


def test_balance_with_64_virtual_nodes() -> None:
    counts = HashRing(NODES, virtual_nodes=64).counts(KEYS)
    assert sum(counts.values()) == len(KEYS)
    for node, n in counts.items():
        assert 0.15 <= n / len(KEYS) <= 0.35, (node, n)


def test_adding_a_node_moves_about_a_fifth_all_to_it() -> None:
    ring = HashRing(NODES)
    bigger = ring.with_node("cache-4")
    moved = [k for k in KEYS if ring.node_for(k) != bigger.node_for(k)]
    assert 0.12 <= len(moved) / len(KEYS) <= 0.28
    assert {bigger.node_for(k) for k in moved} == {"cache-4"}


def test_removing_a_node_moves_only_its_keys() -> None:
    ring = HashRing(NODES)
    smaller = ring.without_node("cache-2")
    for k in KEYS[:5000]:
        if ring.node_for(k) != "cache-2":
            assert smaller.node_for(k) == ring.node_for(k)
        else:
            assert smaller.node_for(k) != "cache-2"


def test_assign_and_counts_agree() -> None:
    ring = HashRing(NODES)
    assigned = ring.assign(KEYS)
    assert set(assigned) == set(NODES)
    assert {n: len(v) for n, v in assigned.items()} == ring.counts(KEYS)
    assert sorted(k for v in assigned.values() for k in v) == sorted(KEYS)


def test_empty_node_still_listed() -> None:
    assert HashRing(NODES).assign([]) == {n: [] for n in NODES}


def test_same_placement_in_another_process() -> None:
    # Python's hash() is salted per process; the ring must not depend on it.
    sample = KEYS[:200]
    here = [HashRing(NODES).node_for(k) for k in sample]
    code = (
        "import json, sys; from cache_client.placement import HashRing; "
        "keys = json.load(sys.stdin); print(json.dumps([HashRing(%r).node_for(k) for k in keys]))" % NODES
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(sample), capture_output=True, text=True, check=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert json.loads(out.stdout) == here


def test_ring_errors() -> None:
    with pytest.raises(ConfigError):
        HashRing([])
    with pytest.raises(ConfigError):
        HashRing(["a", "a"])
    with pytest.raises(ConfigError):
        HashRing(["a"], virtual_nodes=0)
    with pytest.raises(ConfigError):
        HashRing(["a"]).with_node("a")
    with pytest.raises(ConfigError):
        HashRing(["a"]).without_node("b")


def test_place_replicate_and_shard() -> None:
    keys = KEYS[:100]
    rep = place(iter(keys), NODES, "replicate", 64)
    assert rep == {n: keys for n in NODES}
    rep["cache-0"].append("x")
    assert rep["cache-1"] == keys  # lists are independent
    assert place(keys, NODES, "shard", 64) == HashRing(NODES, 64).assign(keys)
    with pytest.raises(ConfigError):
        place(keys, NODES, "broadcast", 64)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        place(keys, [], "replicate", 64)


_NODE_NAMES = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6, unique=True)
_KEY_LISTS = st.lists(st.text(max_size=40), max_size=60)


@settings(max_examples=100, deadline=None)
@given(nodes=_NODE_NAMES, keys=_KEY_LISTS, vnodes=st.integers(1, 32))
def test_assignment_is_deterministic_and_order_free(nodes: list[str], keys: list[str], vnodes: int) -> None:
    a = HashRing(nodes, vnodes).assign(keys)
    b = HashRing(list(reversed(nodes)), vnodes).assign(keys)
    assert a == b
    assert sorted(k for v in a.values() for k in v) == sorted(keys)


@settings(max_examples=100, deadline=None)
@given(nodes=_NODE_NAMES, keys=_KEY_LISTS, new=st.text(min_size=1, max_size=12))
def test_new_node_only_takes_keys(nodes: list[str], keys: list[str], new: str) -> None:
    if new in nodes:
        return
    ring = HashRing(nodes, 16)
    bigger = ring.with_node(new)
    for k in keys:
        assert bigger.node_for(k) in (ring.node_for(k), new)
    assert [bigger.without_node(new).node_for(k) for k in keys] == [ring.node_for(k) for k in keys]
