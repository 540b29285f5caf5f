"""Prewarm plans: what is there, what is cached, what each node must load, how long it will take.

Pure: the caller (CacheCluster.plan) gathers sizes, cached bytes and cache usage; this module only
does arithmetic, so it is tested without any server.

ETA model: seconds = bytes / bandwidth + files * per_file_overhead, with bandwidth the cluster's
aggregate warm rate (all nodes together) and both numbers learnt per datacenter from earlier runs
(state.py); before any run, the configured default bandwidth.
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xdc.errors import CapacityError

if TYPE_CHECKING:
    from cache_client.base import CacheFile

MIB = 1 << 20
# JuiceFS stores a cached block in whole 4 KiB pages: a 100-byte file takes 4 KiB of cache.
CACHE_PAGE = 4096
DEFAULT_PER_FILE_SECONDS = 0.001


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float = 100.0 * MIB
    per_file_s: float = DEFAULT_PER_FILE_SECONDS
    source: str = "default"  # "default" or "measured (N runs)"

    def seconds(self, nbytes: int, files: int) -> float:
        return nbytes / self.bytes_per_s + files * self.per_file_s

    def to_dict(self) -> dict[str, Any]:
        return {"mib_per_s": self.bytes_per_s / MIB, "per_file_s": self.per_file_s, "source": self.source}


@dataclass(frozen=True)
class NodeCapacity:
    """A node's cache: bytes used, its size, and its watermarks (shares of the size). A warm may
    fill it up to the high watermark; room is made down to the low one."""

    used: int
    capacity: int
    high: float = 1.0
    low: float = 1.0

    @property
    def limit(self) -> int:
        return int(self.capacity * self.high)

    @property
    def free(self) -> int:
        """Room left under the high watermark."""
        return max(0, self.limit - self.used)

    def describe(self) -> str:
        s = f"capacity {self.capacity / MIB:.1f} MiB, used {self.used / MIB:.1f} MiB"
        return s + (f", high watermark {self.high:.0%}" if self.high < 1 else "")


@dataclass
class NodeShare:
    node: str
    files: list[CacheFile]  # files this node must (finish) loading
    bytes: int  # bytes still to load (size minus what the node already holds)
    cached_files: int  # files of its share already fully cached
    capacity: NodeCapacity
    dropped: list[CacheFile] = field(default_factory=list)  # trimmed for lack of space
    need: int = 0  # cache space the files take (whole pages)
    _have: Mapping[str, int] = field(default_factory=dict, repr=False)  # path -> bytes the node holds

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity.free

    def to_dict(self) -> dict[str, Any]:
        c = self.capacity
        return {
            "node": self.node,
            "files": len(self.files),
            "bytes": self.bytes,
            "need": self.need,
            "cached_files": self.cached_files,
            "cache_used": c.used,
            "cache_capacity": c.capacity,
            "cache_free": c.free,
            "high_watermark": c.high,
            "low_watermark": c.low,
            "fill_after": (c.used + self.need) / c.capacity if c.capacity else None,
            "dropped": len(self.dropped),
        }

    def fit(self, trim: bool) -> str | None:
        """Make the share fit under the high watermark: with trim, keep files in list order while
        they fit and drop the rest; without, say why it does not fit (None: it does)."""
        if self.fits:
            return None
        c = self.capacity
        if not trim:
            return f"{self.node}: needs {self.need / MIB:.1f} MiB, free {c.free / MIB:.1f} MiB ({c.describe()})"
        keep: list[CacheFile] = []
        kept_bytes = need = 0
        have = self._have
        for f in self.files:
            left = max(0, (f.size or 0) - have.get(f.path, 0))
            room = footprint(left)
            if need + room > c.free:
                self.dropped.append(f)
                continue
            keep.append(f)
            kept_bytes += left
            need += room
        self.files, self.bytes, self.need = keep, kept_bytes, need
        return None


@dataclass
class Plan:
    files: int  # files asked for (after key mapping)
    bytes: int  # bytes of the files present in the volume (each counted once)
    missing: list[CacheFile]  # not in this datacenter's volume
    cached_files: int  # present files already fully cached where they should be
    cached_bytes: int
    shares: dict[str, NodeShare]
    bandwidth: Bandwidth
    trimmed: bool = False
    # list entries that never became files (unreadable line, bad key, no route): (entry, reason)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # how the list was read: format, shape, selector, root
    room: Any = None  # cache_client.watermarks.RoomPlan when a node would pass its high watermark

    def over(self) -> list[str]:
        """Nodes whose share does not fit under their high watermark."""
        return [n for n, s in self.shares.items() if not s.fits]

    def fit(self, trim: bool = False) -> Plan:
        """Every share under its node's high watermark: trimmed (trim=True), or CapacityError
        with every node's numbers."""
        over = [why for s in self.shares.values() if (why := s.fit(trim))]
        if over:
            raise CapacityError("plan does not fit the cache; " + "; ".join(over) + " (use trim to warm what fits)")
        self.trimmed = any(s.dropped for s in self.shares.values())
        return self

    @property
    def warm_files(self) -> int:
        return sum(len(s.files) for s in self.shares.values())

    @property
    def warm_bytes(self) -> int:
        return sum(s.bytes for s in self.shares.values())

    @property
    def eta_seconds(self) -> float:
        return self.bandwidth.seconds(self.warm_bytes, self.warm_files)

    @property
    def dropped(self) -> list[tuple[str, CacheFile]]:
        return [(n, f) for n, s in self.shares.items() for f in s.dropped]

    @property
    def noop(self) -> bool:
        return self.warm_files == 0

    def to_dict(self, max_files: int | None = 1000) -> dict[str, Any]:
        cap = len(self.missing) if max_files is None else max_files
        dropped = self.dropped
        return {
            "files": self.files,
            "bytes": self.bytes,
            "present_files": self.files - len(self.missing),
            "missing_files": len(self.missing),
            "missing": [f.bucket_key for f in self.missing[:cap]],
            "cached_files": self.cached_files,
            "cached_bytes": self.cached_bytes,
            "warm_files": self.warm_files,
            "warm_bytes": self.warm_bytes,
            "eta_seconds": self.eta_seconds,
            "bandwidth": self.bandwidth.to_dict(),
            "trimmed": self.trimmed,
            "dropped": [{"node": n, "bucket_key": f.bucket_key} for n, f in dropped[: (len(dropped) if max_files is None else max_files)]],
            "nodes": {n: s.to_dict() for n, s in self.shares.items()},
            "rejected": [{"entry": e, "reason": r} for e, r in self.rejected[:cap]],
            "rejected_count": len(self.rejected),
            "list": self.source,
            "room": self.room.to_dict() if self.room is not None else None,
        }

    def summary(self) -> str:
        s = (
            f"{self.files} files ({self.bytes / MIB:.1f} MiB present), {len(self.missing)} missing from the volume, "
            f"{self.cached_files} already cached; to warm: {self.warm_files} file loads, "
            f"{self.warm_bytes / MIB:.1f} MiB over {sum(1 for x in self.shares.values() if x.files)} nodes, "
            f"ETA {format_seconds(self.eta_seconds)} at {self.bandwidth.bytes_per_s / MIB:.0f} MiB/s ({self.bandwidth.source})"
        )
        if self.trimmed:
            s += f"; {len(self.dropped)} file loads dropped for lack of cache space"
        if self.rejected:
            s += f"; {len(self.rejected)} list entries rejected"
        if self.room is not None:
            s += f"; {self.room.summary()}"
        return s


def footprint(nbytes: int) -> int:
    """Cache space taken by `nbytes` of file data (whole pages)."""
    return -(-nbytes // CACHE_PAGE) * CACHE_PAGE


def make_plan(
    present: Sequence[CacheFile],
    missing: Sequence[CacheFile],
    shares: Mapping[str, Sequence[CacheFile]],
    cached: Mapping[str, Mapping[str, int]],
    capacity: Mapping[str, NodeCapacity],
    bandwidth: Bandwidth,
    *,
    trim: bool = False,
    enforce: bool = True,
) -> Plan:
    """Build a plan from survey data.

    present: files in the volume, with sizes; shares: node -> the present files it should hold;
    cached: node -> path -> bytes it holds; capacity: node -> cache usage and watermarks.
    With enforce (the default) the plan is fitted under each node's high watermark (`Plan.fit`):
    CapacityError with every node's numbers, or with trim each node keeps its files in list order
    while they fit. enforce=False leaves that to the caller (who may make room first).
    """
    out: dict[str, NodeShare] = {}
    fully = {f.path: True for f in present}
    for node, files in shares.items():
        have = cached.get(node, {})
        todo: list[CacheFile] = []
        todo_bytes = need = done = 0
        for f in files:
            left = max(0, (f.size or 0) - have.get(f.path, 0))
            if left == 0:
                done += 1
                continue
            fully[f.path] = False
            todo.append(f)
            todo_bytes += left
            need += footprint(left)
        out[node] = NodeShare(node, todo, todo_bytes, done, capacity[node], need=need, _have=have)
    cached_files = [f for f in present if fully[f.path]]
    plan = Plan(
        files=len(present) + len(missing),
        bytes=sum(f.size or 0 for f in present),
        missing=list(missing),
        cached_files=len(cached_files),
        cached_bytes=sum(f.size or 0 for f in cached_files),
        shares=out,
        bandwidth=bandwidth,
    )
    return plan.fit(trim) if enforce else plan


def format_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


RECENT_RUNS = 5  # warm runs the estimate learns from
MIN_RUN_SECONDS = 0.2  # runs this short say more about process start-up than about bandwidth


def estimate_bandwidth(runs: Sequence[tuple[int, int, float]], default_mib_s: float) -> Bandwidth:
    """Fit seconds = bytes / bw + files * c over recent runs (bytes, files, seconds).

    With runs of different file-size mixes a least-squares fit separates bandwidth from per-file
    overhead; otherwise (or if the fit is not physical) keep the default overhead and take the
    median bandwidth of the runs, robust to one odd run.
    """
    if not runs:
        return Bandwidth(default_mib_s * MIB, DEFAULT_PER_FILE_SECONDS, "default")
    src = f"measured ({len(runs)} runs)"
    if len(runs) >= 3:
        fit = _fit(runs)
        if fit is not None:
            return Bandwidth(fit[0], fit[1], src)
    bws = [b / max(s - f * DEFAULT_PER_FILE_SECONDS, 1e-3) for b, f, s in runs if b > 0]
    if not bws:
        return Bandwidth(default_mib_s * MIB, DEFAULT_PER_FILE_SECONDS, "default")
    return Bandwidth(statistics.median(bws), DEFAULT_PER_FILE_SECONDS, src)


def _fit(runs: Sequence[tuple[int, int, float]]) -> tuple[float, float] | None:
    # Normal equations for s = a*b + c*f (no intercept): a = 1/bandwidth, c = per-file overhead.
    sbb = sum(b * b for b, _, _ in runs)
    sff = sum(f * f for _, f, _ in runs)
    sbf = sum(b * f for b, f, _ in runs)
    sbs = sum(b * s for b, _, s in runs)
    sfs = sum(f * s for _, f, s in runs)
    det = sbb * sff - sbf * sbf
    if det <= 1e-9 * sbb * sff:  # same file-size mix in every run: a and c can't be told apart
        return None
    a = (sbs * sff - sfs * sbf) / det
    c = (sfs * sbb - sbs * sbf) / det
    if a <= 0 or c < 0:
        return None
    return 1 / a, c
