"""The cache-cluster interface: a few primitives per backend, everything else derived here.

A backend (JuiceFS, the in-memory fake) implements five node-level primitives, like fsspec's
`AbstractFileSystem` leaves `ls`/`_open` abstract:

    stat(files)                  -> size of each file in the volume (None: not in this datacenter)
    cached_bytes(node, files)    -> bytes of each file held in that node's cache
    warm_node(node, files, ...)  -> fill that node's cache with the files
    evict_node(node, files)      -> drop the files from that node's cache
    usage(node)                  -> (used, capacity) bytes of that node's cache

`plan`, `warm`, `check` and `free` over the whole cluster (placement, capacity, progress, per-file
status) are built on them in this class, so every backend reports the same way.

Tracing: `warm` runs each node's share as a `cache.warm_node` span; files of a traced object (the
`traced` contexts) are warmed first, one by one, each a `cache.warm_file` span in the object's own
trace. `warm_file_timed` says how long reading from the store and writing to the cache took where
the backend can tell (JuiceFS from its mount's counters); the default only times the whole file.
"""
from __future__ import annotations

import importlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Protocol

import numpy as np

from cache_client.placement import BalancedPlacement, key_hashes
from cache_client.plan import Bandwidth, NodeCapacity, Plan, make_plan
from xdc import trace
from xdc.errors import CacheError

Placement = Literal["replicate", "shard"]


@dataclass(frozen=True)
class CacheFile:
    """One file to cache: its "bucket/key", its path relative to a node's mount, its size if known."""

    bucket_key: str
    path: str
    size: int | None = None


class FileStatus(str, Enum):
    CACHED = "cached"  # every byte on every node that should hold it
    PARTIAL = "partial"  # some bytes on some of those nodes
    NOT_CACHED = "not_cached"  # in the volume, no byte cached
    MISSING = "missing"  # not in this datacenter's volume at all


@dataclass(frozen=True)
class FileCheck:
    bucket_key: str
    path: str
    status: FileStatus
    size: int | None
    cached: Mapping[str, int]  # node -> cached bytes, for the nodes that should hold the file

    @property
    def reason(self) -> str:
        """Why the file is not cached, in words (empty when it is)."""
        if self.status is FileStatus.MISSING:
            return "not in this datacenter's volume"
        if self.status is FileStatus.CACHED:
            return ""
        short = [f"{n}: {b} of {self.size} bytes" for n, b in sorted(self.cached.items()) if b < (self.size or 0)]
        return "not cached on " + "; ".join(short)

    def to_dict(self) -> dict[str, Any]:
        d = {"bucket_key": self.bucket_key, "status": self.status.value, "size": self.size, "cached": dict(self.cached)}
        if self.status is not FileStatus.CACHED:
            d["reason"] = self.reason
        return d


@dataclass
class CheckReport:
    files: list[FileCheck]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # list entries never checked: (entry, why)

    def by_status(self, status: FileStatus) -> list[FileCheck]:
        return [f for f in self.files if f.status is status]

    @property
    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in FileStatus}
        for f in self.files:
            out[f.status.value] += 1
        return out

    @property
    def bytes_total(self) -> int:
        # what should be cached: every present file on every node that should hold it
        return sum((f.size or 0) * len(f.cached) for f in self.files if f.status is not FileStatus.MISSING)

    @property
    def bytes_cached(self) -> int:
        return sum(min(b, f.size or 0) for f in self.files for b in f.cached.values())

    @property
    def cached_ratio(self) -> float:
        """Cached share of the present files' bytes (1.0 when there is nothing to cache)."""
        total = self.bytes_total
        return 1.0 if total == 0 else self.bytes_cached / total

    @property
    def complete(self) -> bool:
        return not self.rejected and all(f.status is FileStatus.CACHED for f in self.files)

    def not_cached(self) -> list[FileCheck]:
        return [f for f in self.files if f.status is not FileStatus.CACHED]

    def to_dict(self, max_files: int | None = 1000) -> dict[str, Any]:
        bad = self.not_cached()
        return {
            "files": len(self.files),
            "counts": self.counts,
            "bytes_total": self.bytes_total,
            "bytes_cached": self.bytes_cached,
            "cached_ratio": self.cached_ratio,
            "not_cached": [f.to_dict() for f in bad[:max_files]],
            "not_cached_truncated": max(0, len(bad) - max_files) if max_files is not None else 0,
            "rejected": [{"entry": e, "reason": r} for e, r in self.rejected[:max_files]],
            "rejected_count": len(self.rejected),
        }

    def summary(self) -> str:
        c = self.counts
        return (
            f"{len(self.files)} files: {c['cached']} cached, {c['partial']} partly, "
            f"{c['not_cached']} not cached, {c['missing']} missing from the volume; "
            f"{self.cached_ratio:.1%} of bytes cached"
        )


@dataclass(frozen=True)
class NodeWarmResult:
    node: str
    files: int
    bytes: int  # bytes the plan asked this node to warm
    seconds: float
    error: str | None = None


@dataclass
class WarmReport:
    nodes: list[NodeWarmResult]
    seconds: float

    @property
    def files(self) -> int:
        return sum(n.files for n in self.nodes)

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)

    @property
    def errors(self) -> dict[str, str]:
        return {n.node: n.error for n in self.nodes if n.error}

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "nodes": [n.__dict__ for n in self.nodes],
        }


@dataclass
class FreeReport:
    files: int
    freed_bytes: dict[str, int]  # node -> bytes that were cached before and are gone
    left_bytes: dict[str, int]  # node -> bytes of these files still cached after the evict
    kept: dict[str, list[str]] = field(default_factory=dict)  # bucket_key -> datasets still using it
    missing: int = 0
    forced: dict[str, list[str]] = field(default_factory=dict)  # evicted although these datasets use them

    @property
    def complete(self) -> bool:
        return not any(self.left_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "freed_bytes": dict(self.freed_bytes),
            "left_bytes": dict(self.left_bytes),
            "kept": dict(self.kept),
            "missing": self.missing,
            "forced": dict(self.forced),
        }

    def summary(self) -> str:
        freed = sum(self.freed_bytes.values())
        s = f"evicted {self.files} files from {len(self.freed_bytes)} nodes, {freed / 2**20:.1f} MiB freed"
        if self.kept:
            s += f"; kept {len(self.kept)} files still used by other active datasets"
        if self.forced:
            s += f"; forced: evicted {len(self.forced)} files other active datasets still use"
        if not self.complete:
            s += f"; still cached: {self.left_bytes}"
        return s


class ProgressSink(Protocol):
    """Receives warm progress; `add` is called from worker threads."""

    def start(self, files: int, bytes: int) -> None: ...
    def add(self, files: int, bytes: int) -> None: ...
    def finish(self) -> None: ...


ProgressFn = Callable[[int, int], None]  # (files done, bytes done) increments
Traced = Mapping[str, Any]  # bucket_key -> SpanContext of the object's trace in this datacenter


class CacheCluster(ABC):
    """A datacenter's cache cluster: nodes that cache files of one volume."""

    name: str = ""
    dc: str = ""  # the datacenter it serves (set by the topology; names its spans)

    def __init__(self, nodes: Sequence[str], *, placement: Placement = "replicate", virtual_nodes: int = 64,
                 threads_per_node: int = 8, watermarks: Mapping[str, tuple[float, float]] | None = None) -> None:
        if not nodes:
            raise CacheError("a cache cluster needs at least one node")
        self.nodes = list(nodes)
        self.placement: Placement = placement
        self.virtual_nodes = virtual_nodes
        self.threads_per_node = threads_per_node
        # node -> (high, low) shares of its cache size; a node not named may be filled completely
        self.watermarks: dict[str, tuple[float, float]] = dict(watermarks or {})

    # -- primitives ---------------------------------------------------------------------------
    @abstractmethod
    def stat(self, files: Sequence[CacheFile]) -> dict[str, int | None]:
        """path -> size in the volume, None when the file is not there."""

    @abstractmethod
    def cached_bytes(self, node: str, files: Sequence[CacheFile]) -> dict[str, int]:
        """path -> bytes of the file held by this node's cache (files must exist)."""

    @abstractmethod
    def warm_node(self, node: str, files: Sequence[CacheFile], threads: int, on_progress: ProgressFn) -> None:
        """Load the files (all present in the volume) into this node's cache."""

    @abstractmethod
    def evict_node(self, node: str, files: Sequence[CacheFile]) -> None:
        """Drop the files (all present in the volume) from this node's cache."""

    @abstractmethod
    def usage(self, node: str) -> tuple[int, int]:
        """(used, capacity) bytes of this node's cache."""

    def warm_file_timed(self, node: str, f: CacheFile, on_progress: ProgressFn) -> dict[str, float]:
        """Warm one file on one node; returns how many seconds reading it from the object store
        (`read_store_s`) and writing it into the cache (`write_cache_s`) took, where the backend
        can tell ({} otherwise: only the whole is timed)."""
        self.warm_node(node, [f], 1, on_progress)
        return {}

    def warm_share(self, node: str, files: Sequence[CacheFile], threads: int, on_progress: ProgressFn,
                   traced: Traced | None = None) -> None:
        """`warm_node` as a traced step: the files of traced objects first, each timed in its own
        trace (at most tracing.traced_files_per_node), then the rest in one go."""
        with trace.step("cache.warm_node", dc=self.dc or None, node=node, files=len(files)) as node_span:
            limit = getattr(trace.settings(), "traced_files_per_node", 0)
            picked = [f for f in files if f.bucket_key in traced][:limit] if traced and limit else []
            for f in picked:
                self._warm_traced(node, f, traced[f.bucket_key], node_span, on_progress)  # type: ignore[index]
            done = {f.path for f in picked}
            rest = [f for f in files if f.path not in done] if done else files
            if rest:
                self.warm_node(node, rest, threads, on_progress)

    def _warm_traced(self, node: str, f: CacheFile, ctx: Any, node_span: Any, on_progress: ProgressFn) -> None:
        t0 = time.time()
        span = trace.child("cache.warm_file", ctx, start_time=t0, links=[c for c in [trace.context_of(node_span)] if c],
                           attributes=trace.attrs(dc=self.dc or None, key=f.bucket_key, node=node, bytes=f.size))
        try:
            phases = self.warm_file_timed(node, f, on_progress)
        except BaseException as exc:
            trace.end(span, error=exc)
            raise
        t1 = time.time()
        # The backend gives durations, not instants: reading comes first, writing last.
        if "read_store_s" in phases:
            trace.record("cache.read_store", span, t0, min(t1, t0 + phases["read_store_s"]),
                         attributes=trace.attrs(dc=self.dc or None, node=node, position="from start"))
        if "write_cache_s" in phases:
            trace.record("cache.write_cache", span, max(t0, t1 - phases["write_cache_s"]), t1,
                         attributes=trace.attrs(dc=self.dc or None, node=node, position="to end"))
        trace.end(span, end_time=t1, attributes={f"xdc.{k}": v for k, v in phases.items()})

    # -- derived ------------------------------------------------------------------------------
    def owners(self, files: Sequence[CacheFile], *, scope: Sequence[CacheFile] | None = None) -> dict[str, list[CacheFile]]:
        """node -> the files it should hold, by the cluster's placement.

        `shard` balances by bytes over the whole list (cache_client.placement), so a part of a
        list (stragglers to re-warm) must be placed within it: pass the full list as `scope`.
        """
        if self.placement == "replicate" or len(self.nodes) == 1:
            return {n: list(files) for n in self.nodes}
        pool = list(files)
        if scope is not None:
            inside = {f.path for f in scope}
            pool = list(scope) + [f for f in files if f.path not in inside]
        sizes = np.fromiter((-1 if f.size is None else f.size for f in pool), dtype=np.int64, count=len(pool))
        index = BalancedPlacement(self.nodes).assign_hashes(key_hashes(f.bucket_key for f in pool), sizes).tolist()
        out: dict[str, list[CacheFile]] = {n: [] for n in self.nodes}
        if scope is None:
            for f, j in zip(files, index):
                out[self.nodes[j]].append(f)
        else:
            node_of = {f.path: j for f, j in zip(pool, index)}
            for f in files:
                out[self.nodes[node_of[f.path]]].append(f)
        return out

    def cached_bytes_nodes(self, shares: Mapping[str, Sequence[CacheFile]]) -> dict[str, dict[str, int]]:
        """node -> path -> cached bytes, for each node's files (backends may do all nodes at once)."""
        return self._per_node(lambda n: self.cached_bytes(n, shares[n]) if shares.get(n) else {})

    def _survey(self, files: Sequence[CacheFile], scope: Sequence[CacheFile] | None = None,
                ) -> tuple[list[CacheFile], list[CacheFile], dict[str, dict[str, int]]]:
        """(present files with sizes, missing files, node -> path -> cached bytes of its share)."""
        sizes = self.stat(files)
        present = [CacheFile(f.bucket_key, f.path, sizes[f.path]) for f in files if sizes.get(f.path) is not None]
        missing = [f for f in files if sizes.get(f.path) is None]
        shares = self.owners(present, scope=scope)
        cached = self.cached_bytes_nodes(shares)
        return present, missing, cached

    def capacities(self) -> dict[str, NodeCapacity]:
        """Every node's cache usage now, with its watermarks."""
        out = {}
        for n in self.nodes:
            used, capacity = self.usage(n)
            high, low = self.watermarks.get(n, (1.0, 1.0))
            out[n] = NodeCapacity(used=used, capacity=capacity, high=high, low=low)
        return out

    def plan(self, files: Sequence[CacheFile], *, bandwidth: Bandwidth | None = None, trim: bool = False,
             scope: Sequence[CacheFile] | None = None, enforce: bool = True) -> Plan:
        """What warming these files would take: sizes, what is cached, per-node shares, ETA.

        Raises CapacityError when a node's share does not fit under its high watermark, unless
        trim=True (or enforce=False: the caller fits the plan, `Plan.fit`, after making room).
        `scope`: the full list these files are part of (placement is computed over it).
        """
        present, missing, cached = self._survey(files, scope)
        shares = self.owners(present, scope=scope)
        return make_plan(present, missing, shares, cached, self.capacities(), bandwidth or Bandwidth(), trim=trim,
                         enforce=enforce)

    def warm(self, plan: Plan, progress: ProgressSink | None = None, *, traced: Traced | None = None) -> WarmReport:
        """Warm each node's share of the plan, the nodes in parallel (`traced`: see warm_share)."""
        lock = threading.Lock()

        def on_progress(files: int, nbytes: int) -> None:
            if progress is not None:
                with lock:
                    progress.add(files, nbytes)

        if progress is not None:
            progress.start(plan.warm_files, plan.warm_bytes)
        t0 = time.monotonic()
        parent = trace.current()  # the node threads' spans hang off the caller's

        def one(node: str) -> NodeWarmResult:
            share = plan.shares[node]
            t = time.monotonic()
            if not share.files:
                return NodeWarmResult(node, 0, 0, 0.0)
            try:
                with trace.use(parent):
                    self.warm_share(node, share.files, self.threads_per_node, on_progress, traced)
                err = None
            except CacheError as exc:
                err = str(exc)
            return NodeWarmResult(node, len(share.files), share.bytes, time.monotonic() - t, err)

        try:
            results = self._per_node(one, nodes=list(plan.shares))
        finally:
            if progress is not None:
                progress.finish()
        return WarmReport(nodes=[results[n] for n in plan.shares], seconds=time.monotonic() - t0)

    def check(self, files: Sequence[CacheFile]) -> CheckReport:
        """Per file: cached fully / partly / not at all on the nodes that should hold it, or missing."""
        present, missing, cached = self._survey(files)
        shares = self.owners(present)
        holders: dict[str, list[str]] = {}
        for n, fs in shares.items():
            for f in fs:
                holders.setdefault(f.path, []).append(n)
        by_path = {f.path: f for f in present}
        out: list[FileCheck] = []
        missing_paths = {f.path for f in missing}
        for f in files:
            if f.path in missing_paths:
                out.append(FileCheck(f.bucket_key, f.path, FileStatus.MISSING, None, {}))
                continue
            size = by_path[f.path].size or 0
            per = {n: cached[n].get(f.path, 0) for n in holders.get(f.path, [])}
            out.append(FileCheck(f.bucket_key, f.path, status_of(size, per.values()), size, per))
        return CheckReport(out)

    def free(self, files: Sequence[CacheFile]) -> FreeReport:
        """Evict the files from EVERY node (not only the owners: placement may have changed)."""
        sizes = self.stat(files)
        present = [CacheFile(f.bucket_key, f.path, sizes[f.path]) for f in files if sizes.get(f.path) is not None]

        everyone = {n: present for n in self.nodes}
        # all nodes' cached bytes in one pass before and after (one metadata scan, not one a node)
        before = self.cached_bytes_nodes(everyone) if present else {}
        if present:
            self._per_node(lambda n: self.evict_node(n, present))
        after = self.cached_bytes_nodes(everyone) if present else {}
        was = {n: sum(before.get(n, {}).values()) for n in self.nodes}
        left = {n: sum(after.get(n, {}).values()) for n in self.nodes}
        return FreeReport(
            files=len(present),
            freed_bytes={n: was[n] - left[n] for n in self.nodes},
            left_bytes=left,
            missing=len(files) - len(present),
        )

    def _per_node(self, fn: Callable[[str], Any], nodes: Iterable[str] | None = None) -> dict[str, Any]:
        nodes = list(self.nodes if nodes is None else nodes)
        if len(nodes) <= 1:
            return {n: fn(n) for n in nodes}
        with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="cache-node") as pool:
            futs = {n: pool.submit(fn, n) for n in nodes}
            return {n: f.result() for n, f in futs.items()}


def status_of(size: int, cached: Iterable[int]) -> FileStatus:
    per = list(cached)
    if not per or all(b >= size for b in per):
        return FileStatus.CACHED
    if any(b > 0 for b in per):
        return FileStatus.PARTIAL
    return FileStatus.NOT_CACHED


# -- backend registry (by name, lazily imported, like fsspec's) ---------------------------------
_REGISTRY: dict[str, str] = {
    "juicefs": "cache_client.juicefs:JuiceFSCluster",
    "alluxio": "cache_client.alluxio:AlluxioCluster",
    "fake": "cache_client.fake:FakeCluster",
}


def register_backend(name: str, target: str | type[CacheCluster]) -> None:
    """Register a backend class, or "module:Class" imported on first use."""
    _REGISTRY[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def cluster_from_config(cache: Any) -> CacheCluster:
    """The cluster for a datacenter's CacheConfig, by its `backend` name."""
    return get_backend(cache.backend)(cache)  # type: ignore[call-arg]


def get_backend(name: str) -> type[CacheCluster]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise CacheError(f"unknown cache backend {name!r} (known: {sorted(_REGISTRY)})") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]
