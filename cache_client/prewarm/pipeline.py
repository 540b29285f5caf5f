"""The one prewarm pipeline, in phases that the CLI runs in one process and the DAG as tasks:

    release -> list -> plan -> warm -> check -> report

`resolve` fetches the file list (a path, or s3://bucket/key read from the site's own store, where
it was mirrored) and maps every key into the site; it runs once per (release, datacenter). For the
later phases in other processes, `stage` keeps the resolved list in the site's state and
`load_staged` gives it back. Then: `wait_ready` (every file mirrored here) -> `plan_files` (files,
bytes, per-node shares, ETA; room made under the nodes' high watermarks when asked) -> `warm` (all
nodes, or `warm_node` one node) -> `check_and_rewarm` (per file; re-warms what is missing) ->
`finish` (registers the dataset version, records progress, bandwidth and readiness, reports) ->
`announce` (publishes the `dataset.ready` event a version owes once it is 100 % cached here).
`run_prewarm` chains them.

Every report is a dataclass with `to_dict()` (JSON for XCom) and `summary()` (one line for humans).

Tracing: a run is a `prewarm.run` span (a child of its release's trace, else a trace of its own)
with a span per phase. A file whose object was traced into this datacenter (an anchor span in the
state: `xdc.trace.ANCHORS`) is warmed as a step of that object's trace on each node
(`cache.warm_file`), and its check is recorded there too (`cache.check_file`).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cache_client.base import CacheFile, CheckReport, FreeReport, NodeWarmResult, ProgressSink, Traced, WarmReport
from cache_client.filelist import read_file_list
from cache_client.keys import derived_candidate, path_in_mount
from cache_client.plan import MIB, MIN_RUN_SECONDS, RECENT_RUNS, Bandwidth, Plan, estimate_bandwidth, format_seconds
from cache_client.prewarm.progress import Progress, Snapshot
from cache_client.watermarks import Retired, RoomPlan, plan_room
from xdc import trace
from xdc.errors import BadKey, KafkaError, NotReadyError, ObjectNotFound, RoomError
from xdc.events import ReadyEvent
from xdc.io.outbox import OutboxPublisher
from xdc.io.state import NodeUsage, Outgoing
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
    make_room: bool = False  # free retired datasets when the warm would pass a node's high watermark

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
    """A local path as is; s3://bucket/key from the site's own store, where a route mirrored it
    (the key mapped as the list's keys are: s3://idca-drive/x is idcb-drive/x in IDC-B)."""
    if not uri.startswith("s3://"):
        return Path(uri)
    bucket_key = uri.removeprefix("s3://")
    try:
        bucket_key = site.keys.map(bucket_key)
    except BadKey:
        pass  # no route into this site covers it: read it where it says
    bucket, _, key = bucket_key.partition("/")
    out = dest / (Path(key).name or "manifest")
    try:
        out.write_bytes(site.store.get(bucket, key))
    except ObjectNotFound:
        raise NotReadyError(f"file list {uri} is not in {site.name} (yet, as s3://{bucket}/{key})") from None
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
def wait_ready(site: Site, files: Sequence[CacheFile], timeout: float | None = None, poll: float | None = None,
               stat: Callable[[Sequence[CacheFile]], Mapping[str, int | None]] | None = None) -> None:
    """Block until every file exists in the site's volume; NotReadyError names what is still missing.

    `stat` (path -> size, None if absent) defaults to the site's cache; a cache xdc does not reach
    (run by Fluid) is asked through the object store instead (cache_client.prewarm.fluid)."""
    stat = stat or site.cache.stat
    p = site.topology.config.prewarm
    timeout = p.ready_timeout_seconds if timeout is None else timeout
    poll = p.ready_poll_seconds if poll is None else poll
    deadline = time.monotonic() + timeout
    waiting = list(files)
    while True:
        sizes = stat(waiting)
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


def plan_files(site: Site, res: ResolvedList, *, trim: bool = False, make_room: bool = False,
               dry_run: bool = False) -> Plan:
    """Files, bytes, per-node shares and ETA of warming a resolved list here.

    A warm that would push a cache node past its high watermark names the retired datasets whose
    files bring the node under its low watermark (oldest retirement first; a file an active or
    staged dataset uses, or this list holds, stays): with make_room they are evicted first (with
    dry_run the plan only names them); without, the plan is refused (RoomError naming them, with
    their bytes), or with trim cut to what fits. Nothing to free: CapacityError (or trim) as before.
    """
    bw = bandwidth(site)
    plan = site.cache.plan(res.files, bandwidth=bw, enforce=False)
    if plan.over():
        room = plan_room({n: s.capacity for n, s in plan.shares.items()},
                         {n: s.need for n, s in plan.shares.items()}, retired_room(site, res))
        frees = any(n.frees for n in room.nodes.values())
        plan.room = room if frees else None
        if frees and make_room and (room.enough or trim):
            if not dry_run:
                free_room(site, room)
                plan = site.cache.plan(res.files, bandwidth=bw, trim=trim)
                plan.room = room
        elif frees and not trim:
            raise RoomError(room.refusal(), room.to_dict())
        else:
            plan.fit(trim)  # CapacityError with every node's numbers, or trimmed to what fits
    plan.rejected = res.rejected
    plan.source = res.source
    record_fill(site, {n: s.capacity for n, s in plan.shares.items()})
    return plan


def retired_room(site: Site, res: ResolvedList) -> list[Retired]:
    """Retired dataset versions, oldest retirement first, with what of each may leave each node:
    its files cached there that no active or staged dataset uses, the list being planned does not
    hold, and an older retired version did not claim already (a file is counted once)."""
    prewarm, cache = site.state.prewarm, site.cache
    taken = {f.bucket_key for f in res.files}
    owned = []
    for reg in prewarm.retired():
        keys = [k for k in prewarm.keys_of(reg.dataset, reg.version) if k not in taken]
        taken.update(keys)
        owned.append((reg, keys))
    every = [k for _, keys in owned for k in keys]
    in_use = prewarm.users(every, staged=True)
    files = {k: to_cache_file(k, site.bucket_root) for k in every if k not in in_use}
    sizes = cache.stat(list(files.values()))
    present = [f for f in files.values() if sizes.get(f.path) is not None]
    cached = cache.cached_bytes_nodes({n: present for n in cache.nodes}) if present else {}
    out = []
    for reg, keys in owned:
        mine = [files[k] for k in keys if k in files]
        on = {n: [f for f in mine if cached.get(n, {}).get(f.path, 0) > 0] for n in cache.nodes}
        nbytes = {n: sum(cached[n][f.path] for f in fs) for n, fs in on.items()}
        if any(nbytes.values()):
            out.append(Retired(reg.dataset, reg.version, reg.retired_at, on, nbytes))
    return out


def free_room(site: Site, room: RoomPlan) -> None:
    """Evict the chosen retired datasets' files from the nodes they were chosen for; recorded."""
    for node, nr in room.nodes.items():
        for r, nbytes in nr.frees:
            site.cache.evict_node(node, list(r.files[node]))
            site.state.prewarm.record_eviction(r.dataset, r.version, node, len(r.files[node]), nbytes, "room")
            log.info("made room on %s in %s: evicted %s (%d files, %.1f MiB)", node, site.name, r.label,
                     len(r.files[node]), nbytes / MIB)
    room.made = True


def record_fill(site: Site, capacities: Mapping[str, Any] | None = None) -> None:
    """Keep each cache node's fill and watermarks in the state (the dashboard shows them)."""
    caps = site.cache.capacities() if capacities is None else capacities
    site.state.prewarm.record_nodes([NodeUsage(n, c.used, c.capacity, c.high, c.low) for n, c in caps.items()])


def traced_files(site: Site, files: Sequence[CacheFile]) -> Traced:
    """bucket_key -> the trace context of each file whose object was traced into this datacenter."""
    if not trace.active() or not files:
        return {}
    got = site.state.traces.anchors([f.bucket_key for f in files], trace.ANCHORS)
    return {k: trace.sampled_context(t, sp) for k, (t, sp) in got.items()}


def warm(site: Site, plan: Plan, progress: ProgressSink | None) -> WarmReport:
    """Every node's share of the plan, the nodes in parallel; the achieved bandwidth is learnt."""
    report = site.cache.warm(plan, progress, traced=traced_files(site, [f for s in plan.shares.values() for f in s.files]))
    record_warm(site, [*report.nodes])
    return report


def warm_node(site: Site, plan: Plan, node: str) -> NodeWarmResult:
    """One node's share of the plan (the DAG maps this over the nodes)."""
    share = plan.shares[node]
    t0 = time.monotonic()
    error = None
    if share.files:
        try:
            site.cache.warm_share(node, share.files, site.cache.threads_per_node, lambda files, nbytes: None,
                                  traced_files(site, share.files))
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
    traced = traced_files(site, res.files)
    t_check = time.time()
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
        w = cluster.warm(replan, None, traced=traced)
        rounds.append(w.to_dict() | {"errors": w.errors})
        t_check = time.time()
        check = cluster.check(res.files)
    check.rejected = res.rejected
    t_checked = time.time()
    for c in check.files:
        if c.bucket_key in traced:
            trace.record("cache.check_file", traced[c.bucket_key], t_check, t_checked,
                         attributes=trace.attrs(dc=site.name, key=c.bucket_key, status=c.status.value,
                                                **{f"cached.{n}": b for n, b in c.cached.items()}),
                         error=None if c.status.value == "cached" else c.reason)
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
    ready_event: ReadyEvent | None = None  # set when this run made the version ready here

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
            "ready_event": self.ready_event.to_dict() if self.ready_event else None,
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
        report.ready_event = record_readiness(site, request, report)
    record_fill(site)
    log.info("%s", report.summary())
    return report


def record_readiness(site: Site, request: Request, report: PrewarmReport) -> ReadyEvent | None:
    """Keep the version's readiness here; when it BECOMES 100 % cached, its `dataset.ready` event
    is queued in the state's outbox (same transaction) for the site's releases topic, and returned."""
    assert request.dataset
    check = report.check
    ev = ReadyEvent(request.dataset, request.version, site.name, files=len(check.files),
                    bytes=sum(f.size or 0 for f in check.files), cached_ratio=check.cached_ratio, time=time.time(),
                    manifest=request.manifest)
    became = site.state.prewarm.record_ready(
        ev.dataset, ev.version, ready=report.complete, files=ev.files, nbytes=ev.bytes, cached_ratio=ev.cached_ratio,
        manifest_uri=request.manifest, now=ev.time,
        announce=Outgoing(site.topics.releases, ev.dataset.encode(), ev.to_json()))
    if became:
        log.info("%s@%s is 100 %% cached in %s: ready", ev.dataset, ev.version, site.name)
    return ev if became else None


def announce(site: Site, *, strict: bool = True) -> int:
    """Publish what the state's outbox owes (`dataset.ready` events; also applied events a mirror
    here has not sent yet: the same messages it would send). Rows go once they are flushed.

    strict=False: a broker that cannot take them is a warning, not an error; the rows stay in the
    outbox for the next publisher (a later prewarm or the mirror in this datacenter)."""
    publisher = OutboxPublisher(site.state.catalog, lambda: site.producer, lambda: site.consumer(None),
                                name="prewarm", tag=f"{site.name}:")  # the state's identity, as the mirror's
    try:
        return publisher.flush()
    except KafkaError as exc:
        if strict:
            raise
        log.warning("dataset.ready not published from %s yet (kept in the outbox): %s", site.name, exc)
        return 0
    finally:
        publisher.close()


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
                progress: ProgressSink | None = None, ready_timeout: float | None = None,
                publish_ready: Literal["no", "try", "must"] = "no", trace_parent: Any = None) -> PrewarmReport:
    """resolve -> ready gate -> plan -> warm -> check and re-warm -> finish -> announce, in this process.

    publish_ready: "must" publishes the dataset.ready event a version owes (KafkaError if the broker
    cannot take it), "try" only warns then (it stays in the outbox), "no" leaves it there.
    `trace_parent`: the release's trace context (else the run is a trace of its own)."""
    attrs = trace.attrs(dc=site.name, dataset=request.dataset, version=request.version or None)
    span = trace.child("prewarm.run", trace_parent, attributes=attrs) if trace_parent is not None \
        else trace.root("prewarm.run", always=True, attributes=attrs)
    try:
        with trace.use(span):
            report = _run_phases(site, request, wait=wait, trim=trim, progress=progress, ready_timeout=ready_timeout)
            if publish_ready != "no":
                with trace.step("prewarm.announce", dc=site.name):
                    announce(site, strict=publish_ready == "must")
    except BaseException as exc:
        trace.end(span, error=exc)
        raise
    trace.end(span, attributes={"xdc.complete": report.complete})
    return report


def _run_phases(site: Site, request: Request, *, wait: bool, trim: bool, progress: ProgressSink | None,
                ready_timeout: float | None) -> PrewarmReport:
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    @contextmanager
    def phase(name: str) -> Iterator[None]:  # timed for the report, and a span of the run
        t = time.monotonic()
        with trace.step(f"prewarm.{name}", dc=site.name):
            yield
        timings[name] = timings.get(name, 0.0) + time.monotonic() - t

    with phase("resolve"):
        res = resolve(site, request)
    if wait:  # the ready gate: mirrored into this DC, or NotReadyError naming what is not
        with phase("ready"):
            wait_ready(site, res.files, ready_timeout)
    with phase("plan"):
        plan = plan_files(site, res, trim=trim, make_room=request.make_room)
    log.info("prewarm %s in %s: %s", request.label, site.name, plan.summary())
    sink = progress if progress is not None else Progress(
        plan.bandwidth, desc=f"prewarm {site.name}",
        callback=live_progress(site, request.dataset, deadline=request.deadline) if request.dataset else None)
    rounds: list[dict[str, Any]] = []
    with phase("warm"):
        w = warm(site, plan, sink)
    rounds.append(w.to_dict() | {"errors": w.errors})
    with phase("check"):
        check = check_and_rewarm(site, res, plan, rounds, trim=trim)
    return finish(site, request, res, plan, rounds, check, time.monotonic() - t0, timings)


def plan_prewarm(site: Site, request: Request, *, trim: bool = False) -> Plan:
    """What a prewarm of this list would do in the site (nothing is loaded, nothing is freed: with
    request.make_room the plan names what room would be made)."""
    plan = plan_files(site, resolve(site, request), trim=trim, make_room=request.make_room, dry_run=True)
    log.info("plan %s in %s: %s", request.label, site.name, plan.summary())
    return plan


def check_list(site: Site, request: Request) -> CheckReport:
    """Per-file cache status of a list in the site (cached / partly / not / missing from the volume)."""
    res = resolve(site, request)
    report = site.cache.check(res.files)
    report.rejected = res.rejected
    return report


def retire(site: Site, dataset: str, version: str) -> bool:
    """Retire a dataset version without evicting anything: its files stay cached (a later version
    may share them) until a warm needs the room (`plan_files` with make_room, oldest first)."""
    done = site.state.prewarm.retire(dataset, version)
    log.info("retire %s@%s in %s: %s", dataset, version, site.name, "done" if done else "not registered here")
    return done


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
        for node, nbytes in report.freed_bytes.items():
            if nbytes:
                site.state.prewarm.record_eviction(request.dataset, request.version, node, report.files, nbytes, "free")
    record_fill(site)
    log.info("free %s in %s: %s", request.label, site.name, report.summary())
    return report
