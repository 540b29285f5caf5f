"""The one prewarm pipeline, in phases that the CLI runs in one process and the DAG as tasks:

    release -> list -> plan -> warm -> check -> report

`resolve` fetches the file list (a path, or s3://bucket/key read from the site's own store, where
it was mirrored) and maps every key into the site; it runs once per (release, datacenter). For the
later phases in other processes, `stage` keeps the resolved list in the site's state and
`load_staged` gives it back. Then: `wait_ready` (every file mirrored here) -> `plan_files` (files,
bytes, per-node shares, ETA) -> `warm` (all nodes, or `warm_node` one node) -> `check_and_rewarm`
(per file; re-warms what is missing) -> `finish` (registers the dataset version, records progress
and bandwidth, reports). `run_prewarm` chains them.

Every report is a dataclass with `to_dict()` (JSON for XCom) and `summary()` (one line for humans).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_client.base import CacheFile, CheckReport, FreeReport, NodeWarmResult, ProgressSink, WarmReport
from cache_client.filelist import read_file_list
from cache_client.keys import derived_candidate, path_in_mount
from cache_client.plan import MIB, MIN_RUN_SECONDS, RECENT_RUNS, Bandwidth, Plan, estimate_bandwidth, format_seconds
from cache_client.prewarm.progress import Progress, Snapshot
from xdc.errors import BadKey, NotReadyError, ObjectNotFound
from xdc.metrics import METRICS
from xdc.topology import Site

log = logging.getLogger("xdc.prewarm")
NOT_READY_LISTED = 50  # missing keys named in a NotReadyError message (all are on .missing)
REJECTED_KEPT = 1000  # rejected list entries kept with a staged list (all are counted)


Root = str | Mapping[str, str] | None  # cache_client.filelist's root= (a prefix, or one per modality)


@dataclass(frozen=True)
class Request:
    """What to warm: a file list (or dataset index), and the dataset@version it is (None: unnamed)."""

    manifest: str  # a local path, or s3://bucket/key read from the site's store
    dataset: str | None = None
    version: str = ""
    prefix: str | None = None  # keys must stay under this bucket/prefix
    deadline: float | None = None  # epoch seconds by which the dataset should be warm (alerting)
    select: str | None = None  # where the paths are in an index (JMESPath, or csv/parquet columns)
    root: Root = None  # joined to relative paths (mmdet3d v2 data_prefix style)

    @property
    def label(self) -> str:
        return f"{self.dataset}@{self.version}" if self.dataset else self.manifest


@dataclass
class ResolvedList:
    files: list[CacheFile]
    entries: int  # list entries read (after duplicates)
    rejected: list[tuple[str, str]]  # (entry, reason): unreadable lines and keys with no place here
    rejected_count: int = 0
    derived: int = 0  # frames replaced by their 720p derivative
    source: dict[str, Any] = field(default_factory=dict)  # how the list was read: format, shape, selector

    def info(self) -> dict[str, Any]:
        return {"entries": self.entries, "rejected": self.rejected[:REJECTED_KEPT],
                "rejected_count": self.rejected_count, "derived": self.derived, "source": self.source}


def to_cache_file(bucket_key: str, bucket_root: str, size: int | None = None) -> CacheFile:
    """A "bucket/key" in this DC -> CacheFile with its path relative to a node's mount."""
    return CacheFile(bucket_key, str(path_in_mount(Path("/"), bucket_key, bucket_root)).lstrip("/"), size)


# -- list ---------------------------------------------------------------------------------------
def resolve(site: Site, request: Request) -> ResolvedList:
    """Read the request's file list and map each key into `site` ("bucket/key" there + mount path)."""
    with tempfile.TemporaryDirectory(prefix="xdc-manifest-") as tmp:
        fl = read_file_list(_fetch_manifest(site, request.manifest, Path(tmp)), select=request.select,
                            root=request.root)
        mapper, root = site.keys, site.bucket_root
        files: list[CacheFile] = []
        rejected: list[tuple[str, str]] = []
        seen: set[str] = set()
        for e in fl:
            try:
                bk = mapper.map_under(e.key, request.prefix)
            except BadKey as exc:
                rejected.append((e.key, f"line {e.line}: {exc}"))
                continue
            if bk not in seen:  # two source keys that map to one key here
                seen.add(bk)
                files.append(to_cache_file(bk, root, e.size))
        rejected = [(f"line {ln}", reason) for ln, reason in fl.stats.unreadable] + rejected
        res = ResolvedList(files, fl.stats.entries, rejected,
                           len(rejected) + max(0, fl.stats.unreadable_count - len(fl.stats.unreadable)),
                           source=fl.describe())
    cfg = site.topology.config
    if cfg.prewarm.prefer_derived and cfg.resize is not None:
        _prefer_derived(site, res)
    return res


def _fetch_manifest(site: Site, uri: str, dest: Path) -> Path:
    if not uri.startswith("s3://"):
        return Path(uri)
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    out = dest / (Path(key).name or "manifest")
    try:
        out.write_bytes(site.store.get(bucket, key))
    except ObjectNotFound:
        raise NotReadyError(f"file list {uri} is not in {site.name} (yet)") from None
    return out


def _prefer_derived(site: Site, res: ResolvedList) -> None:
    """Swap a frame for its 720p derivative where the derivative exists in the volume."""
    resize = site.topology.config.resize
    assert resize is not None
    cand: dict[int, CacheFile] = {}
    for i, f in enumerate(res.files):
        for raw in resize.prefixes:
            d = derived_candidate(f.bucket_key, raw, resize.derived_prefix)
            if d:
                cand[i] = to_cache_file(d, site.bucket_root)
                break
    sizes = site.cache.stat(list(cand.values()))
    for i, d in cand.items():
        if sizes.get(d.path) is not None:
            res.files[i] = CacheFile(d.bucket_key, d.path, sizes[d.path])
            res.derived += 1


def stage(site: Site, request: Request, res: ResolvedList) -> None:
    """Keep a resolved list in the site's state for the later phases (run by other processes)."""
    assert request.dataset, "only a named dataset can be staged"
    site.state.prewarm.stage(request.dataset, request.version, (f.bucket_key for f in res.files),
                             request.manifest, res.info())


def load_staged(site: Site, request: Request) -> ResolvedList:
    """The list `stage` kept (the manifest is not read again)."""
    assert request.dataset
    got = site.state.prewarm.staged(request.dataset, request.version)
    if got is None:
        raise NotReadyError(f"{request.label} was never resolved in {site.name}")
    keys, info = got
    return ResolvedList([to_cache_file(k, site.bucket_root) for k in keys], int(info.get("entries", len(keys))),
                        [tuple(x) for x in info.get("rejected", [])],  # type: ignore[misc]
                        int(info.get("rejected_count", 0)), int(info.get("derived", 0)), dict(info.get("source", {})))


# -- ready, plan, warm, check -------------------------------------------------------------------
def wait_ready(site: Site, files: Sequence[CacheFile], timeout: float | None = None, poll: float | None = None) -> None:
    """Block until every file exists in the site's volume; NotReadyError names what is still missing."""
    p = site.topology.config.prewarm
    timeout = p.ready_timeout_seconds if timeout is None else timeout
    poll = p.ready_poll_seconds if poll is None else poll
    deadline = time.monotonic() + timeout
    waiting = list(files)
    while True:
        sizes = site.cache.stat(waiting)
        waiting = [f for f in waiting if sizes.get(f.path) is None]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(f.bucket_key for f in waiting[:NOT_READY_LISTED])
            more = f" (+{len(waiting) - NOT_READY_LISTED} more)" if len(waiting) > NOT_READY_LISTED else ""
            err = NotReadyError(f"{len(waiting)} of {len(files)} files not in the datacenter ({site.name}) after "
                                f"{timeout:.0f}s: {names}{more}")
            err.missing = [f.bucket_key for f in waiting]  # type: ignore[attr-defined]
            raise err
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def bandwidth(site: Site) -> Bandwidth:
    """What warming costs here: learnt from the site's recent warm runs, else the default."""
    runs = site.state.prewarm.runs(RECENT_RUNS, MIN_RUN_SECONDS)
    return estimate_bandwidth(runs, site.topology.config.prewarm.default_bandwidth_mib_s)


def plan_files(site: Site, res: ResolvedList, *, trim: bool = False) -> Plan:
    plan = site.cache.plan(res.files, bandwidth=bandwidth(site), trim=trim)
    plan.rejected = res.rejected
    plan.source = res.source
    return plan


def warm(site: Site, plan: Plan, progress: ProgressSink | None) -> WarmReport:
    """Every node's share of the plan, the nodes in parallel; the achieved bandwidth is learnt."""
    report = site.cache.warm(plan, progress)
    record_warm(site, [*report.nodes])
    return report


def warm_node(site: Site, plan: Plan, node: str) -> NodeWarmResult:
    """One node's share of the plan (the DAG maps this over the nodes)."""
    share = plan.shares[node]
    t0 = time.monotonic()
    error = None
    if share.files:
        try:
            site.cache.warm_node(node, share.files, site.cache.threads_per_node, lambda files, nbytes: None)
        except Exception as exc:  # noqa: BLE001 - reported; the check phase re-warms what is missing
            error = str(exc)
    return NodeWarmResult(node, len(share.files), share.bytes, time.monotonic() - t0, error)


def record_warm(site: Site, nodes: Sequence[NodeWarmResult]) -> None:
    """Learn the bandwidth of a warm whose nodes ran in parallel (skipped if any failed)."""
    nbytes, nfiles = sum(n.bytes for n in nodes), sum(n.files for n in nodes)
    seconds = max((n.seconds for n in nodes), default=0.0)
    if nfiles and seconds > 0 and not any(n.error for n in nodes):
        site.state.prewarm.record_run(nbytes, nfiles, seconds, nodes=len(nodes))


def check_and_rewarm(site: Site, res: ResolvedList, plan: Plan, rounds: list[dict[str, Any]], *,
                     trim: bool = False) -> CheckReport:
    """Check every file; re-warm what is not cached, up to `prewarm.max_rewarm_rounds` rounds
    (files the plan dropped for lack of space are not retried). `rounds` gets one row per warm."""
    cluster = site.cache
    check = cluster.check(res.files)
    dropped = {f.path for _, f in plan.dropped}
    for _ in range(site.topology.config.prewarm.max_rewarm_rounds):
        again = [CacheFile(c.bucket_key, c.path, c.size) for c in check.not_cached()
                 if c.size is not None and c.path not in dropped]
        if not again:
            break
        # placed within the whole list: `shard` balances over all of it
        scope = [CacheFile(c.bucket_key, c.path, c.size) for c in check.files if c.size is not None]
        replan = cluster.plan(again, bandwidth=plan.bandwidth, trim=trim, scope=scope)
        if replan.noop:
            break
        log.info("re-warm %d file loads still not cached in %s", replan.warm_files, site.name)
        w = cluster.warm(replan, None)
        rounds.append(w.to_dict() | {"errors": w.errors})
        check = cluster.check(res.files)
    check.rejected = res.rejected
    return check


# -- report -------------------------------------------------------------------------------------
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
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

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
            "dc": self.dc, "dataset": self.dataset, "version": self.version, "complete": self.complete,
            "list_entries": self.list_entries, "derived": self.derived, "plan": self.plan.to_dict(max_files),
            "rounds": self.rounds, "check": self.check.to_dict(max_files), "seconds": self.seconds,
            "warmed_files": self.warmed_files, "warmed_bytes": self.warmed_bytes,
            "registered_keys": self.registered_keys, "not_cached": self.not_cached[:max_files],
            "not_cached_count": len(self.not_cached), "timings": self.timings,
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


def finish(site: Site, request: Request, res: ResolvedList, plan: Plan, rounds: list[dict[str, Any]],
           check: CheckReport, seconds: float, timings: dict[str, float] | None = None) -> PrewarmReport:
    """Register the dataset version as active here (a later free of another dataset keeps its
    files), publish its readiness to the state (dashboard) and Prometheus, and report."""
    registered = None
    if request.dataset:
        registered = site.state.prewarm.register(request.dataset, request.version,
                                                 (f.bucket_key for f in res.files), request.manifest)
    report = PrewarmReport(site.name, request.dataset, request.version, res.entries, plan, rounds, check, seconds,
                           res.derived, registered, _why_not_cached(check, plan, rounds), timings or {})
    if request.dataset:
        ready = report.complete
        site.state.prewarm.record_progress(request.dataset, files_done=check.counts.get("cached", 0),
                                           files_total=len(res.files), bytes_done=check.bytes_cached,
                                           bytes_total=check.bytes_total, eta_s=0.0,
                                           cached_ratio=check.cached_ratio, ready=ready)
        METRICS.set_dataset_state(request.dataset, site.name, cached_ratio=check.cached_ratio, ready=ready)
    log.info("%s", report.summary())
    return report


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


def live_progress(site: Site, dataset: str, *, deadline: float | None = None,
                  every_s: float = 2.0) -> Callable[[Snapshot], None]:
    """A Progress callback: snapshots to the state (the dashboard's panel, at most one per
    every_s and always the last) and to Prometheus."""
    last = [0.0]

    def cb(snap: Snapshot) -> None:
        METRICS.set_prewarm(dataset, site.name, files_done=snap.files_done, files_total=snap.files_total,
                            bytes_done=snap.bytes_done, bytes_total=snap.bytes_total, eta_seconds=snap.eta_seconds,
                            deadline=deadline)
        t = time.monotonic()
        final = snap.files_total and snap.files_done >= snap.files_total
        if not final and t - last[0] < every_s:
            return
        last[0] = t
        site.state.prewarm.record_progress(dataset, files_done=snap.files_done, files_total=snap.files_total,
                                           bytes_done=snap.bytes_done, bytes_total=snap.bytes_total,
                                           eta_s=0.0 if final else snap.eta_seconds)
    return cb


# -- the commands ---------------------------------------------------------------------------------
def run_prewarm(site: Site, request: Request, *, wait: bool = True, trim: bool = False,
                progress: ProgressSink | None = None, ready_timeout: float | None = None) -> PrewarmReport:
    """resolve -> ready gate -> plan -> warm -> check and re-warm -> finish, in this process."""
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    mark = [t0]

    def lap(phase: str) -> None:
        now = time.monotonic()
        timings[phase] = timings.get(phase, 0.0) + now - mark[0]
        mark[0] = now

    res = resolve(site, request)
    lap("resolve")
    if wait:  # the ready gate: mirrored into this DC, or NotReadyError naming what is not
        wait_ready(site, res.files, ready_timeout)
        lap("ready")
    plan = plan_files(site, res, trim=trim)
    log.info("prewarm %s in %s: %s", request.label, site.name, plan.summary())
    lap("plan")
    sink = progress if progress is not None else Progress(
        plan.bandwidth, desc=f"prewarm {site.name}",
        callback=live_progress(site, request.dataset, deadline=request.deadline) if request.dataset else None)
    rounds: list[dict[str, Any]] = []
    w = warm(site, plan, sink)
    rounds.append(w.to_dict() | {"errors": w.errors})
    lap("warm")
    check = check_and_rewarm(site, res, plan, rounds, trim=trim)
    lap("check")
    return finish(site, request, res, plan, rounds, check, time.monotonic() - t0, timings)


def plan_prewarm(site: Site, request: Request, *, trim: bool = False) -> Plan:
    """What a prewarm of this list would do in the site (nothing is loaded)."""
    plan = plan_files(site, resolve(site, request), trim=trim)
    log.info("plan %s in %s: %s", request.label, site.name, plan.summary())
    return plan


def check_list(site: Site, request: Request) -> CheckReport:
    """Per-file cache status of a list in the site (cached / partly / not / missing from the volume)."""
    res = resolve(site, request)
    report = site.cache.check(res.files)
    report.rejected = res.rejected
    return report


def free_list(site: Site, request: Request, *, force: bool = False) -> FreeReport:
    """Evict a list from every node of the site's cache, keeping files another active dataset uses.

    With a dataset, that registration is retired (its own keys never count as "still used").
    force=True evicts shared files too and says which datasets lose them.
    """
    res = resolve(site, request)
    exclude = (request.dataset, request.version) if request.dataset else None
    users = site.state.prewarm.users([f.bucket_key for f in res.files], exclude=exclude)
    evict = res.files if force else [f for f in res.files if f.bucket_key not in users]
    report = site.cache.free(evict)
    if force:
        report.forced = users
    else:
        report.kept = users
    if request.dataset:
        site.state.prewarm.retire(request.dataset, request.version)
    log.info("free %s in %s: %s", request.label, site.name, report.summary())
    return report
