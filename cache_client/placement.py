"""Which cache node warms which key: replicate to all, or shard (balanced by bytes).

`shard` places with `BalancedPlacement`: rendezvous hashing (each key ranks the nodes by a hash of
key and node; the first is its home) with bounded loads by bytes (a node takes keys only up to
(1 + epsilon) x the mean bytes; the rest go to their next-ranked node with room). Rendezvous alone
is balanced to ~0.1 % at millions of keys, and adding a node moves 1/(N+1) of them, all to the
new node; the bound keeps small lists with uneven sizes within 1 + epsilon (a single file larger
than the room left is the only excess). The older `HashRing` (consistent hashing with virtual
nodes) is kept for comparison: with 64 virtual nodes its arcs alone make the busiest of 4 nodes
hold ~1.24x the mean.

Placement is deterministic: CRC-32/Adler-32 key hashes and blake2b node seeds (never Python's salted
hash()), a canonical order by key
hash for the bounded-load spill (independent of the list's order), numpy integer arithmetic. It is
a function of the whole list (keys and sizes): a subset placed alone may spill differently, so
callers that handle part of a list (a re-warm of stragglers) place it within the full list
(`CacheCluster.owners(files, scope=...)`).
"""
from __future__ import annotations

import zlib
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from hashlib import blake2b
from typing import Literal

import numpy as np

from xdc.errors import ConfigError

Placement = Literal["replicate", "shard"]
DEFAULT_EPSILON = 0.02
_RANK_CHUNK = 1 << 20  # keys ranked at once (memory: 8 bytes x nodes x chunk)


def _point(data: str) -> int:
    return int.from_bytes(blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """A 64-bit hash of each key (uint64), the same in every process and on every platform:
    zlib's CRC-32 (high half) and Adler-32 (low half) of the UTF-8 key, both computed in C
    (half the cost of a blake2b digest a key); the placement mixes it per node (splitmix64)."""
    bs = [k.encode("utf-8", "surrogatepass") for k in keys]
    hi = np.fromiter(map(zlib.crc32, bs), dtype=np.uint64, count=len(bs))
    lo = np.fromiter(map(zlib.adler32, bs), dtype=np.uint64, count=len(bs))
    return (hi << np.uint64(32)) | lo


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 wraps like the C original)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _check_nodes(nodes: Sequence[str]) -> tuple[str, ...]:
    names = tuple(nodes)
    if not names:
        raise ConfigError("placement needs at least one node")
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate cache node names: {sorted(names)}")
    return names


class BalancedPlacement:
    """Rendezvous ranking with bounded loads by bytes over node names (see the module docstring)."""

    def __init__(self, nodes: Sequence[str], epsilon: float = DEFAULT_EPSILON) -> None:
        self.nodes = _check_nodes(nodes)
        if not 0 <= epsilon < 1:
            raise ConfigError(f"epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon
        self._seeds = np.array([_point(f"node:{n}") for n in self.nodes], dtype=np.uint64)

    def __repr__(self) -> str:
        return f"BalancedPlacement({list(self.nodes)!r}, epsilon={self.epsilon})"

    def with_node(self, name: str) -> BalancedPlacement:
        if name in self.nodes:
            raise ConfigError(f"node {name!r} is already placed on")
        return BalancedPlacement([*self.nodes, name], self.epsilon)

    def without_node(self, name: str) -> BalancedPlacement:
        if name not in self.nodes:
            raise ConfigError(f"node {name!r} is not placed on")
        return BalancedPlacement([n for n in self.nodes if n != name], self.epsilon)

    def ranks(self, hashes: np.ndarray) -> np.ndarray:
        """(keys x nodes) node indices, each row best first: rendezvous order."""
        n, m = len(hashes), len(self.nodes)
        out = np.empty((n, m), dtype=np.int16)
        for lo in range(0, n, _RANK_CHUNK):
            scores = _mix(hashes[lo:lo + _RANK_CHUNK, None] ^ self._seeds[None, :])
            # highest score first; ties (2**-64) broken by node order
            out[lo:lo + len(scores)] = np.argsort(~scores, axis=1, kind="stable")
        return out

    def first_choices(self, hashes: np.ndarray) -> np.ndarray:
        """Each key's rendezvous home (the first column of `ranks`), without ranking the rest."""
        out = np.empty(len(hashes), dtype=np.int16)
        for lo in range(0, len(hashes), _RANK_CHUNK):
            scores = _mix(hashes[lo:lo + _RANK_CHUNK, None] ^ self._seeds[None, :])
            out[lo:lo + len(scores)] = np.argmax(scores, axis=1)  # first of equal maxima, as argsort
        return out

    def assign_hashes(self, hashes: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
        """Node index per key (input order). `sizes`: bytes per key, negative = unknown (counted as
        the mean known size; all unknown: every key weighs 1).

        Memory: about 12 bytes a key when no node overflows its bound at home (large lists), about
        30 bytes plus 2 a node otherwise."""
        n, m = len(hashes), len(self.nodes)
        if n == 0 or m == 1:
            return np.zeros(n, dtype=np.int32)
        w = _weights(sizes, n)
        cap = (1.0 + self.epsilon) * float(w.sum(dtype=np.float64)) / m
        home = self.first_choices(hashes)
        if np.bincount(home, weights=w, minlength=m).max() <= cap:
            return home.astype(np.int32)  # every node within the bound at home: nothing spills
        del home
        return self._bounded(hashes, w, cap)

    def _bounded(self, hashes: np.ndarray, w: np.ndarray, cap: float) -> np.ndarray:
        n, m = len(hashes), len(self.nodes)
        # Canonical order by key hash: the spill does not depend on the order of the list.
        perm = np.argsort(hashes, kind="stable")
        rank = self.ranks(hashes[perm])
        wc = w[perm]
        load = np.zeros(m, dtype=np.float64)
        home = np.full(n, -1, dtype=np.int16)
        # Files no node can take within the bound go first, each to the least loaded node (ties
        # by the key's own ranking), so the rounds below fill the other nodes around them.
        for p in np.flatnonzero(wc > cap).tolist():
            j = min(rank[p].tolist(), key=lambda k: load[k])
            home[p] = j
            load[j] += wc[p]
        pending: np.ndarray | None = None if (home < 0).all() else np.flatnonzero(home < 0)
        for r in range(m):
            for j in range(m):
                # keys whose r-th choice is j, in canonical order; weights >= 0, so the ones that
                # fit are a prefix of them
                idx = np.flatnonzero(rank[:, 0] == j) if pending is None else pending[rank[pending, r] == j]
                if not len(idx):
                    continue
                cs = np.cumsum(wc[idx], dtype=np.int64)
                k = int(np.searchsorted(cs, cap - load[j], side="right"))
                if k:
                    home[idx[:k]] = j
                    load[j] += float(cs[k - 1])
            pending = np.flatnonzero(home < 0)
            if not len(pending):
                break
        assert pending is not None
        for p in pending.tolist():  # no ranked node had room left (a file larger than the slack)
            j = min(rank[p].tolist(), key=lambda k: load[k])
            home[p] = j
            load[j] += wc[p]
        out = np.empty(n, dtype=np.int32)
        out[perm] = home
        return out

    def assign(self, keys: Sequence[str], sizes: Sequence[int | None] | None = None) -> dict[str, list[str]]:
        """Keys per node, in input order; every node appears, possibly with no keys."""
        idx = self.assign_hashes(key_hashes(keys), _size_array(sizes, len(keys)))
        out: dict[str, list[str]] = {nd: [] for nd in self.nodes}
        lists = [out[nd] for nd in self.nodes]
        for k, j in zip(keys, idx.tolist()):
            lists[j].append(k)
        return out


def _size_array(sizes: Sequence[int | None] | None, n: int) -> np.ndarray | None:
    if sizes is None:
        return None
    return np.fromiter((-1 if s is None else s for s in sizes), dtype=np.int64, count=n)


def _weights(sizes: np.ndarray | None, n: int) -> np.ndarray:
    if sizes is None:
        return np.ones(n, dtype=np.int8)
    w = np.asarray(sizes, dtype=np.int64)
    known = w >= 0
    if not known.any():
        return np.ones(n, dtype=np.int8)
    if not known.all():
        w = w.copy()
        w[~known] = max(1, round(float(w[known].mean())))
    return w


def loads(index: np.ndarray, nodes: int, sizes: np.ndarray | None = None) -> np.ndarray:
    """Keys (or bytes) per node from a node index per key."""
    if sizes is None:
        return np.bincount(index, minlength=nodes)
    return np.bincount(index, weights=_weights(sizes, len(index)).astype(np.float64), minlength=nodes)


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
    sizes: Sequence[int | None] | None = None,
) -> dict[str, list[str]]:
    """Keys per node: `replicate` gives every node every key, `shard` balances them
    (BalancedPlacement; `virtual_nodes` only matters for the old HashRing)."""
    if placement == "shard":
        return BalancedPlacement(nodes).assign(list(keys), sizes)
    if placement != "replicate":
        raise ConfigError(f"unknown placement {placement!r} (replicate or shard)")
    names = list(_check_nodes(nodes))
    shared = list(keys)  # `keys` may be a one-shot iterator
    # One list per node (copies of pointers only) so a caller may change one safely.
    return {n: list(shared) for n in names}
