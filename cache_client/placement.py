"""Which cache node warms which key: replicate to all, or shard by consistent hashing.

The ring hashes with blake2b (64-bit points), never Python's hash(): every process, the planner
and the DAG tasks alike, must place a key on the same node. Each node owns `virtual_nodes`
points, so adding a fifth node to four moves about a fifth of the keys, all to the new node.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from hashlib import blake2b
from typing import Literal

from xdc.errors import ConfigError

Placement = Literal["replicate", "shard"]


def _point(data: str) -> int:
    return int.from_bytes(blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over node names; immutable (with_node/without_node return new ones)."""

    def __init__(self, nodes: Sequence[str], virtual_nodes: int = 64) -> None:
        names = list(nodes)
        if not names:
            raise ConfigError("a hash ring needs at least one node")
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate cache node names: {sorted(names)}")
        if virtual_nodes < 1:
            raise ConfigError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.nodes: tuple[str, ...] = tuple(names)
        self.virtual_nodes = virtual_nodes
        # Sorted by (point, node) so the ring does not depend on the order nodes were given in.
        ring = sorted((_point(f"{n}#{i}"), n) for n in names for i in range(virtual_nodes))
        self._points = [p for p, _ in ring]
        self._owners = [n for _, n in ring]

    def __repr__(self) -> str:
        return f"HashRing({list(self.nodes)!r}, virtual_nodes={self.virtual_nodes})"

    def node_for(self, key: str) -> str:
        # The first point clockwise from the key's hash owns it.
        i = bisect_right(self._points, _point(key))
        return self._owners[i if i < len(self._owners) else 0]

    def assign(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """Keys per node, in input order; every node appears, possibly with no keys."""
        out: dict[str, list[str]] = {n: [] for n in self.nodes}
        for k in keys:
            out[self.node_for(k)].append(k)
        return out

    def counts(self, keys: Iterable[str]) -> dict[str, int]:
        """How many keys each node gets, without keeping the keys (for huge lists)."""
        out = dict.fromkeys(self.nodes, 0)
        for k in keys:
            out[self.node_for(k)] += 1
        return out

    def with_node(self, name: str) -> HashRing:
        if name in self.nodes:
            raise ConfigError(f"node {name!r} is already on the ring")
        return HashRing([*self.nodes, name], self.virtual_nodes)

    def without_node(self, name: str) -> HashRing:
        if name not in self.nodes:
            raise ConfigError(f"node {name!r} is not on the ring")
        return HashRing([n for n in self.nodes if n != name], self.virtual_nodes)


def place(
    keys: Iterable[str],
    nodes: Sequence[str],
    placement: Placement,
    virtual_nodes: int = 64,
) -> dict[str, list[str]]:
    """Keys per node: `replicate` gives every node every key, `shard` uses a HashRing."""
    if placement == "shard":
        return HashRing(nodes, virtual_nodes).assign(keys)
    if placement != "replicate":
        raise ConfigError(f"unknown placement {placement!r} (replicate or shard)")
    names = list(nodes)
    if not names:
        raise ConfigError("placement needs at least one node")
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate cache node names: {sorted(names)}")
    shared = list(keys)  # `keys` may be a one-shot iterator
    # One list per node (copies of pointers only) so a caller may change one safely.
    return {n: list(shared) for n in names}
