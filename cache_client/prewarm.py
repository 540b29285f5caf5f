"""Prewarm orchestration: file list -> keys in this DC -> ready gate -> plan -> warm -> check ->
re-warm misses -> report -> record bandwidth.

Library code called by the CLI (`xdc prewarm plan|run|check|free`) and the DAGs; every report is a
dataclass with `to_dict()` (JSON for XCom) and `summary()` (one line for humans).
A `cluster` or `state` argument replaces the configured ones (tests pass the in-memory fake).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cache_client.base import CacheCluster, CacheFile, CheckReport, FreeReport, ProgressSink, cluster_from_config
from cache_client.filelist import ListStats, read_file_list
from cache_client.keys import KeyMapper, derived_candidate, path_in_mount
from cache_client.plan import MIB, Plan, format_seconds
from cache_client.progress import Progress, Snapshot
from cache_client.state import PrewarmState
from xdc.config import XdcConfig
from xdc.errors import BadKey, CacheError, NotReadyError

log = logging.getLogger("xdc.prewarm")
NOT_READY_LISTED = 50  # missing keys named in a NotReadyError message (all are on .missing)


# -- building blocks -------------------------------------------------------------------------------
def cluster_for(cfg: XdcConfig, dc: str) -> CacheCluster:
    cache = cfg.dc(dc).cache
    if cache is None:
        raise CacheError(f"datacenter {dc} has no cache cluster configured")
    return cluster_from_config(cache)


def state_for(cfg: XdcConfig, dc: str) -> PrewarmState:
    return PrewarmState(cfg.catalog_path(dc))


def _bucket_root(cfg: XdcConfig, dc: str) -> str:
    cache = cfg.dc(dc).cache
    return cache.bucket_root if cache else ""


def to_cache_file(bucket_key: str, bucket_root: str, size: int | None = None) -> CacheFile:
    """A "bucket/key" in this DC -> CacheFile with its path relative to a node's mount."""
    return CacheFile(bucket_key, str(path_in_mount(Path("/"), bucket_key, bucket_root)).lstrip("/"), size)


@dataclass
class ResolvedList:
    files: list[CacheFile]
    stats: ListStats
    rejected: list[tuple[str, str]]  # (entry, reason): unreadable lines and keys with no place here
    derived: int = 0  # frames replaced by their 720p derivative
    source: dict[str, Any] = field(default_factory=dict)  # format, shape, selector, root (FileList.describe)


Root = str | Mapping[str, str] | None


def resolve_list(cfg: XdcConfig, dc: str, list_path: str | Path, *, prefix: str | None = None,
                 select: str | None = None, root: Root = None, cluster: CacheCluster | None = None) -> ResolvedList:
    """Read a file list or dataset index and map each key into `dc` ("bucket/key" there + path in
    the mount). `select`/`root`: see cache_client.filelist.read_file_list."""
    fl = read_file_list(list_path, select=select, root=root)
    mapper = KeyMapper(cfg, dc)
    root = _bucket_root(cfg, dc)
    files: list[CacheFile] = []
    rejected: list[tuple[str, str]] = []
    seen: set[str] = set()
    for e in fl:
        try:
            bk = mapper.map_under(e.key, prefix)
            if bk in seen:  # two source keys that map to one key here
                continue
            seen.add(bk)
            files.append(to_cache_file(bk, root, e.size))
        except BadKey as exc:
            rejected.append((e.key, f"line {e.line}: {exc}"))
    rejected = [(f"line {ln}", reason) for ln, reason in fl.stats.unreadable] + rejected
    res = ResolvedList(files, fl.stats, rejected, source=fl.describe())
    if cfg.prewarm.prefer_derived and cfg.resize is not None:
        _prefer_derived(cfg, dc, res, cluster or cluster_for(cfg, dc))
    return res


def _prefer_derived(cfg: XdcConfig, dc: str, res: ResolvedList, cluster: CacheCluster) -> None:
    """Swap a frame for its 720p derivative where the derivative exists in the volume."""
    assert cfg.resize is not None
    root = _bucket_root(cfg, dc)
    cand: dict[int, CacheFile] = {}
    for i, f in enumerate(res.files):
        for raw in cfg.resize.prefixes:
            d = derived_candidate(f.bucket_key, raw, cfg.resize.derived_prefix)
            if d:
                cand[i] = to_cache_file(d, root)
                break
    sizes = cluster.stat(list(cand.values()))
    for i, d in cand.items():
        if sizes.get(d.path) is not None:
            res.files[i] = CacheFile(d.bucket_key, d.path, sizes[d.path])
            res.derived += 1


def wait_for_files(cluster: CacheCluster, files: Sequence[CacheFile], timeout: float, poll: float) -> None:
    """Block until every file exists in the volume; NotReadyError names what is still missing."""
    deadline = time.monotonic() + timeout
    waiting = list(files)
    while True:
        sizes = cluster.stat(waiting)
        waiting = [f for f in waiting if sizes.get(f.path) is None]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(f.bucket_key for f in waiting[:NOT_READY_LISTED])
            more = f" (+{len(waiting) - NOT_READY_LISTED} more)" if len(waiting) > NOT_READY_LISTED else ""
            err = NotReadyError(f"{len(waiting)} of {len(files)} files not in the datacenter after {timeout:.0f}s: {names}{more}")
            err.missing = [f.bucket_key for f in waiting]  # type: ignore[attr-defined]
            raise err
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def wait_ready(cfg: XdcConfig, dc: str, bucket_keys: Sequence[str], timeout: float | None = None,
               poll: float | None = None, *, cluster: CacheCluster | None = None) -> None:
    """Ready = every "bucket/key" (already in `dc`'s namespace) exists in the DC's volume."""
    root = _bucket_root(cfg, dc)
    wait_for_files(cluster or cluster_for(cfg, dc), [to_cache_file(k, root) for k in bucket_keys],
                   cfg.prewarm.ready_timeout_seconds if timeout is None else timeout,
                   cfg.prewarm.ready_poll_seconds if poll is None else poll)


# -- the four commands -----------------------------------------------------------------------------
def plan_prewarm(cfg: XdcConfig, dc: str, list_path: str | Path, dataset: str | None = None, *,
                 prefix: str | None = None, select: str | None = None, root: Root = None, trim: bool = False,
                 cluster: CacheCluster | None = None, state: PrewarmState | None = None) -> Plan:
    """What a prewarm of this list would do in `dc` (nothing is loaded). `dataset` is only a label."""
    cluster = cluster or cluster_for(cfg, dc)
    state = state or state_for(cfg, dc)
    res = resolve_list(cfg, dc, list_path, prefix=prefix, select=select, root=root, cluster=cluster)
    plan = cluster.plan(res.files, bandwidth=state.bandwidth(dc, cfg.prewarm.default_bandwidth_mib_s), trim=trim)
    plan.rejected = res.rejected
    plan.source = res.source
    if dataset:
        log.info("plan %s in %s: %s", dataset, dc, plan.summary())
    return plan


@dataclass
class PrewarmReport:
    dc: str
    dataset: str | None
    version: str
    list_entries: int
    plan: Plan
    rounds: list[dict[str, Any]]  # one warm per round: files, bytes, seconds, errors
    check: CheckReport
    seconds: float
    derived: int = 0
    registered_keys: int | None = None
    not_cached: list[dict[str, Any]] = field(default_factory=list)  # {bucket_key|entry, reason}
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (resolve, ready, plan, warm, check, rewarm)

    @property
    def complete(self) -> bool:
        return not self.not_cached

    @property
    def warmed_bytes(self) -> int:
        return sum(r["bytes"] for r in self.rounds)

    @property
    def warmed_files(self) -> int:
        return sum(r["files"] for r in self.rounds)

    def to_dict(self, max_files: int = 1000) -> dict[str, Any]:
        return {
            "dc": self.dc,
            "dataset": self.dataset,
            "version": self.version,
            "complete": self.complete,
            "list_entries": self.list_entries,
            "derived": self.derived,
            "plan": self.plan.to_dict(max_files),
            "rounds": self.rounds,
            "check": self.check.to_dict(max_files),
            "seconds": self.seconds,
            "warmed_files": self.warmed_files,
            "warmed_bytes": self.warmed_bytes,
            "registered_keys": self.registered_keys,
            "not_cached": self.not_cached[:max_files],
            "not_cached_count": len(self.not_cached),
            "timings": self.timings,
        }

    def summary(self) -> str:
        rate = self.warmed_bytes / MIB / self.seconds if self.seconds > 0 else 0.0
        head = f"prewarm {self.dataset or 'list'} in {self.dc}: "
        head += "complete" if self.complete else f"INCOMPLETE, {len(self.not_cached)} not cached"
        return (
            f"{head}; {self.check.summary()}; warmed {self.warmed_files} file loads, "
            f"{self.warmed_bytes / MIB:.1f} MiB in {format_seconds(self.seconds)} ({rate:.1f} MiB/s), "
            f"{len(self.rounds)} round(s)"
        )


def run_prewarm(cfg: XdcConfig, dc: str, list_path: str | Path, dataset: str | None = None, *,
                version: str = "", prefix: str | None = None, select: str | None = None, root: Root = None,
                wait: bool = True, trim: bool = False,
                progress: ProgressSink | None = None, cluster: CacheCluster | None = None,
                state: PrewarmState | None = None, ready_timeout: float | None = None) -> PrewarmReport:
    """Prewarm a list into `dc`'s cache until every file is verified cached (or rounds run out).

    With `dataset`, the list is registered as that dataset@version, active in `dc`, so a later
    free of another dataset keeps these files.
    """
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    mark = [t0]

    def lap(phase: str) -> None:
        now = time.monotonic()
        timings[phase] = timings.get(phase, 0.0) + now - mark[0]
        mark[0] = now

    cluster = cluster or cluster_for(cfg, dc)
    state = state or state_for(cfg, dc)
    res = resolve_list(cfg, dc, list_path, prefix=prefix, select=select, root=root, cluster=cluster)
    lap("resolve")

    if wait:  # the ready gate: mirrored into this DC, or NotReadyError naming what is not
        wait_for_files(cluster, res.files,
                       cfg.prewarm.ready_timeout_seconds if ready_timeout is None else ready_timeout,
                       cfg.prewarm.ready_poll_seconds)
        lap("ready")

    bandwidth = state.bandwidth(dc, cfg.prewarm.default_bandwidth_mib_s)
    plan = cluster.plan(res.files, bandwidth=bandwidth, trim=trim)
    plan.rejected = res.rejected
    plan.source = res.source
    log.info("prewarm %s in %s: %s", dataset or list_path, dc, plan.summary())
    lap("plan")

    sink = progress if progress is not None else Progress(
        bandwidth, desc=f"prewarm {dc}", callback=_publish_progress(cfg, dc, dataset) if dataset else None)
    rounds: list[dict[str, Any]] = []
    warm = cluster.warm(plan, sink)
    rounds.append(warm.to_dict() | {"errors": warm.errors})
    if plan.warm_files and not warm.errors and warm.seconds > 0:
        state.record_run(dc, plan.warm_bytes, plan.warm_files, warm.seconds, nodes=len(cluster.nodes))
    lap("warm")

    check = cluster.check(res.files)
    lap("check")
    dropped = {f.path for _, f in plan.dropped}
    for _ in range(cfg.prewarm.max_rewarm_rounds):
        again = [CacheFile(c.bucket_key, c.path, c.size) for c in check.not_cached()
                 if c.size is not None and c.path not in dropped]
        if not again:
            break
        # placed within the whole list: `shard` balances over all of it
        scope = [CacheFile(c.bucket_key, c.path, c.size) for c in check.files if c.size is not None]
        replan = cluster.plan(again, bandwidth=bandwidth, trim=trim, scope=scope)
        if replan.noop:
            break
        log.info("re-warm %d file loads still not cached", replan.warm_files)
        warm = cluster.warm(replan, None)
        rounds.append(warm.to_dict() | {"errors": warm.errors})
        check = cluster.check(res.files)
        lap("rewarm")
    check.rejected = res.rejected

    registered = None
    if dataset:
        registered = state.register(dataset, version, dc, (f.bucket_key for f in res.files), str(list_path))

    report = PrewarmReport(dc, dataset, version, res.stats.entries, plan, rounds, check,
                           time.monotonic() - t0, res.derived, registered, _why_not_cached(check, plan, rounds), timings)
    if dataset:  # the dashboard's and Prometheus' view of this dataset in this datacenter
        from xdc.lag import record_prewarm_progress
        from xdc.metrics import METRICS
        ready = not report.not_cached
        record_prewarm_progress(cfg, dc, dataset, files_done=check.counts.get("cached", 0),
                                files_total=len(res.files), bytes_done=check.bytes_cached,
                                bytes_total=check.bytes_total, eta_s=0.0, cached_ratio=check.cached_ratio,
                                ready=ready)
        METRICS.set_dataset_state(dataset, dc, cached_ratio=check.cached_ratio, ready=ready)
    log.info("%s", report.summary())
    return report


def _publish_progress(cfg: XdcConfig, dc: str, dataset: str) -> Callable[[Snapshot], None]:
    """Live progress to the catalog (dashboard) and to Prometheus."""
    from xdc.lag import prewarm_progress_callback
    from xdc.metrics import METRICS
    store = prewarm_progress_callback(cfg, dc, dataset)

    def cb(snap: Snapshot) -> None:
        store(snap)
        METRICS.set_prewarm(dataset, dc, files_done=snap.files_done, files_total=snap.files_total,
                            bytes_done=snap.bytes_done, bytes_total=snap.bytes_total, eta_seconds=snap.eta_seconds)
    return cb


def _why_not_cached(check: CheckReport, plan: Plan, rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every file (or list entry) not cached at the end, with the reason."""
    dropped: dict[str, list[str]] = {}
    for node, f in plan.dropped:
        dropped.setdefault(f.path, []).append(node)
    errors = {n: e for r in rounds for n, e in r["errors"].items()}
    out: list[dict[str, Any]] = [{"entry": e, "reason": r} for e, r in check.rejected]
    for c in check.not_cached():
        reason = c.reason
        if c.path in dropped:
            reason = f"dropped from the plan: no cache space on {', '.join(dropped[c.path])}"
        elif errors and c.size is not None:
            reason += "; warm errors: " + "; ".join(f"{n}: {e}" for n, e in errors.items())
        out.append({"bucket_key": c.bucket_key, "status": c.status.value, "reason": reason})
    return out


def check_list(cfg: XdcConfig, dc: str, list_path: str | Path, *, prefix: str | None = None,
               select: str | None = None, root: Root = None, cluster: CacheCluster | None = None) -> CheckReport:
    """Per-file cache status of a list in `dc` (cached / partly / not / missing from the volume)."""
    cluster = cluster or cluster_for(cfg, dc)
    res = resolve_list(cfg, dc, list_path, prefix=prefix, select=select, root=root, cluster=cluster)
    report = cluster.check(res.files)
    report.rejected = res.rejected
    return report


def free_list(cfg: XdcConfig, dc: str, list_path: str | Path, dataset: str | None = None, *,
              version: str = "", prefix: str | None = None, select: str | None = None, root: Root = None,
              force: bool = False,
              cluster: CacheCluster | None = None, state: PrewarmState | None = None) -> FreeReport:
    """Evict a list from every node of `dc`'s cache, keeping files another active dataset uses.

    With `dataset`, that registration is retired (its own keys never count as "still used").
    force=True evicts shared files too and says which datasets lose them.
    """
    cluster = cluster or cluster_for(cfg, dc)
    state = state or state_for(cfg, dc)
    res = resolve_list(cfg, dc, list_path, prefix=prefix, select=select, root=root, cluster=cluster)
    users = state.users(dc, [f.bucket_key for f in res.files], exclude=(dataset, version) if dataset else None)
    if force:
        evict = res.files
    else:
        evict = [f for f in res.files if f.bucket_key not in users]
    report = cluster.free(evict)
    if force:
        report.forced = users
    else:
        report.kept = users
    if dataset:
        state.retire(dataset, version, dc)
    log.info("free %s in %s: %s", dataset or list_path, dc, report.summary())
    return report
