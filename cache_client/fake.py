"""An in-memory cache cluster for unit tests of planning, progress and orchestration (no I/O).

The volume is a dict path -> size; each node's cache is a dict path -> cached bytes. Knobs let
tests make a node miss files on a warm (`lose`), so re-warm rounds and miss reports are exercised.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from cache_client.base import CacheCluster, CacheFile, Placement, ProgressFn
from xdc.errors import CacheError


class FakeCluster(CacheCluster):
    name = "fake"

    def __init__(
        self,
        nodes: Sequence[str] = ("n1", "n2"),
        *,
        volume: Mapping[str, int] | None = None,
        capacity: int = 1 << 30,
        placement: Placement = "replicate",
        virtual_nodes: int = 64,
        threads_per_node: int = 4,
        watermarks: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        super().__init__(nodes, placement=placement, virtual_nodes=virtual_nodes, threads_per_node=threads_per_node,
                         watermarks=watermarks)
        self.volume: dict[str, int] = dict(volume or {})
        self.capacity = {n: capacity for n in self.nodes}
        self.cache: dict[str, dict[str, int]] = {n: {} for n in self.nodes}
        self.lose: dict[str, set[str]] = {n: set() for n in self.nodes}  # paths a warm "fails" to load, once
        self.warm_calls: list[tuple[str, list[str]]] = []

    def stat(self, files: Sequence[CacheFile]) -> dict[str, int | None]:
        return {f.path: self.volume.get(f.path) for f in files}

    def cached_bytes(self, node: str, files: Sequence[CacheFile]) -> dict[str, int]:
        c = self.cache[node]
        return {f.path: c.get(f.path, 0) for f in files}

    def warm_node(self, node: str, files: Sequence[CacheFile], threads: int, on_progress: ProgressFn) -> None:
        self.warm_calls.append((node, [f.path for f in files]))
        for f in files:
            if f.path not in self.volume:
                raise CacheError(f"{node}: {f.path} not in the volume")
            size = self.volume[f.path]
            before = self.cache[node].get(f.path, 0)
            if f.path in self.lose[node]:
                self.lose[node].discard(f.path)
                self.cache[node][f.path] = size // 2  # a partly loaded file
                on_progress(1, size // 2 - min(before, size // 2))
                continue
            self.cache[node][f.path] = size
            on_progress(1, size - before)

    def evict_node(self, node: str, files: Sequence[CacheFile]) -> None:
        for f in files:
            self.cache[node].pop(f.path, None)

    def usage(self, node: str) -> tuple[int, int]:
        return sum(self.cache[node].values()), self.capacity[node]
