"""Placement of keys on cache nodes (pure logic): the balanced shard placement, and the older
consistent-hash ring it replaced (kept for comparison)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_client.base import CacheFile
from cache_client.fake import FakeCluster
from cache_client.placement import BalancedPlacement, HashRing, key_hashes, loads, place
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
    assert place(keys, NODES, "shard", 64) == BalancedPlacement(NODES).assign(keys)
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


# -- balanced placement ---------------------------------------------------------------------------

def _sizes(rng: random.Random, n: int) -> list[int]:
    # frames and lidar sweeps: log-normal around 300 KB, a long tail up to tens of MB
    return [int(rng.lognormvariate(12.6, 1.0)) for _ in range(n)]


def _busiest(index: np.ndarray, nodes: int, sizes: list[int] | None = None) -> float:
    ld = loads(index, nodes, None if sizes is None else np.array(sizes))
    return float(ld.max() / ld.mean())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_busiest_node_within_2_percent_of_the_mean_by_bytes(seed: int) -> None:
    rng = random.Random(seed)
    print("seed", seed)
    keys = [f"drive/ds{seed}/cam{i % 6}/{i:07d}.jpg" for i in range(5000)]
    sizes = _sizes(rng, len(keys))
    bp = BalancedPlacement(NODES)
    index = bp.assign_hashes(key_hashes(keys), np.array(sizes))
    assert _busiest(index, 4, sizes) <= 1.02
    assert index.min() >= 0 and index.max() < 4 and len(index) == len(keys)


def test_the_old_ring_was_unbalanced_and_the_new_placement_is_not() -> None:
    """The issue's measurement, on 100,000 keys: 64 virtual nodes leave the busiest of 4 nodes
    well above the mean (1.24x at 10 M keys); the balanced placement stays within 1.02x."""
    keys = [f"frames/datasets/ds-{i % 97:03d}/cam{i % 8}/frame-{i:09d}.jpg" for i in range(100_000)]
    ring = HashRing(NODES, 64).counts(keys)
    assert max(ring.values()) / (len(keys) / 4) > 1.15
    index = BalancedPlacement(NODES).assign_hashes(key_hashes(keys))
    assert _busiest(index, 4) <= 1.02


@pytest.mark.parametrize(("n", "seed"), [(4, 11), (8, 12)])
def test_adding_a_node_moves_about_one_in_n_plus_one(n: int, seed: int) -> None:
    rng = random.Random(seed)
    print("seed", seed)
    keys = [f"drive/x/{rng.getrandbits(64):016x}.bin" for _ in range(20_000)]
    sizes = np.array(_sizes(rng, len(keys)))
    nodes = [f"cache-{i}" for i in range(n)]
    h = key_hashes(keys)
    before = BalancedPlacement(nodes).assign_hashes(h, sizes)
    bigger = BalancedPlacement(nodes).with_node("cache-new")
    after = bigger.assign_hashes(h, sizes)
    moved = before != after
    share = moved.mean()
    assert abs(share - 1 / (n + 1)) < 0.25 / (n + 1), share
    assert (after[moved] == n).mean() > 0.9  # almost all of them to the new node
    assert _busiest(after, n + 1, list(sizes)) <= 1.02


def test_removing_a_node_moves_little_else() -> None:
    rng = random.Random(5)
    keys = [f"drive/y/{i}" for i in range(20_000)]
    sizes = np.array(_sizes(rng, len(keys)))
    h = key_hashes(keys)
    bp = BalancedPlacement(NODES)
    before = bp.assign_hashes(h, sizes)
    after = bp.without_node("cache-2").assign_hashes(h, sizes)
    names_after = [n for n in NODES if n != "cache-2"]
    stayed = [NODES[b] == names_after[a] for b, a in zip(before.tolist(), after.tolist()) if NODES[b] != "cache-2"]
    assert np.mean(stayed) > 0.97


def test_placement_ignores_list_order_and_process() -> None:
    rng = random.Random(9)
    keys = [f"drive/z/{i}.jpg" for i in range(3000)]
    sizes = _sizes(rng, len(keys))
    a = BalancedPlacement(NODES).assign(keys, sizes)
    perm = list(range(len(keys)))
    rng.shuffle(perm)
    b = BalancedPlacement(NODES).assign([keys[i] for i in perm], [sizes[i] for i in perm])
    assert {n: sorted(v) for n, v in a.items()} == {n: sorted(v) for n, v in b.items()}
    code = ("import json, sys; from cache_client.placement import BalancedPlacement; d = json.load(sys.stdin); "
            "print(json.dumps(BalancedPlacement(d['nodes']).assign(d['keys'], d['sizes'])))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps({"nodes": NODES, "keys": keys, "sizes": sizes}),
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "777"},
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert json.loads(out.stdout) == a


def test_a_file_larger_than_the_slack_still_lands_somewhere() -> None:
    keys = ["drive/huge.bin"] + [f"drive/s/{i}" for i in range(100)]
    sizes = [10**9] + [1000] * 100
    out = BalancedPlacement(NODES).assign(keys, sizes)
    assert sorted(k for v in out.values() for k in v) == sorted(keys)
    huge_node = next(n for n, v in out.items() if "drive/huge.bin" in v)
    assert out[huge_node] == ["drive/huge.bin"]  # the others fill the other nodes


def test_unknown_sizes_count_as_the_mean_known_size() -> None:
    keys = [f"drive/u/{i}" for i in range(4000)]
    sizes = [None if i % 2 else 500 for i in range(4000)]
    index = BalancedPlacement(NODES).assign_hashes(key_hashes(keys), np.array([-1 if s is None else s for s in sizes]))
    assert _busiest(index, 4) <= 1.021


@settings(max_examples=60, deadline=None)
@given(nodes=_NODE_NAMES, sizes=st.lists(st.one_of(st.none(), st.integers(0, 10**7)), max_size=80))
def test_every_key_placed_once_deterministically(nodes: list[str], sizes: list[int | None]) -> None:
    keys = [f"drive/p/{i}" for i in range(len(sizes))]
    a = BalancedPlacement(nodes).assign(keys, sizes)
    assert sorted(k for v in a.values() for k in v) == sorted(keys)
    assert a == BalancedPlacement(list(nodes)).assign(keys, sizes)
    assert set(a) == set(nodes)


def test_cluster_places_a_part_of_a_list_within_the_whole() -> None:
    """A re-warm of stragglers must send each file to the node the full plan chose."""
    rng = random.Random(21)
    files = [CacheFile(f"drive/r/{i}", f"drive/r/{i}", s) for i, s in enumerate(_sizes(rng, 400))]
    cluster = FakeCluster(NODES, placement="shard")
    whole = {f.path: n for n, fs in cluster.owners(files).items() for f in fs}
    part = files[::7]
    within = cluster.owners(part, scope=files)
    assert {f.path: n for n, fs in within.items() for f in fs} == {f.path: whole[f.path] for f in part}
    alone = cluster.owners(part)  # placed alone the bounded spill can differ: why scope exists
    assert sorted(f.path for fs in alone.values() for f in fs) == sorted(f.path for f in part)


def test_fast_path_equals_the_bounded_algorithm_when_nothing_spills() -> None:
    h = key_hashes([f"drive/f/{i}" for i in range(50_000)])
    bp = BalancedPlacement(NODES)
    fast = bp.assign_hashes(h)  # 50,000 keys: every node within 2 % at home
    assert (fast == bp._bounded(h, np.ones(len(h), dtype=np.int8), cap=float("inf"))).all()
    assert (fast == bp.ranks(h)[:, 0]).all()
