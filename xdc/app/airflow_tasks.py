"""What the project's DAGs (dags/) call: each task is one of these functions.

The DAG files only wire them into tasks; each takes and returns plain, JSON-able values (XCom), so
a task's inputs and outputs are readable in the UI and the logic is tested without Airflow. The
prewarm tasks are the phases of the one pipeline (cache_client.prewarm.pipeline): the file list is
fetched and resolved once per (release, datacenter) by `unit_resolve`, kept in that datacenter's
state, and the later tasks read it from there. Each unit is recorded in its datacenter's release
ledger when the run takes it (`prewarm_units`) and gets its outcome there in `unit_check`; the
`reconcile_units` task adds the releases some datacenter has no result for. A datacenter whose cache Fluid runs (`cache.mode: fluid`) gets its
units emitted as Fluid DataLoads (`unit_emit`) instead of planned and warmed.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from cache_client.base import NodeWarmResult
from cache_client.prewarm import fluid, pipeline
from cache_client.prewarm.reconcile import owed_releases
from cache_client.prewarm.release import request_of, wants
from mirror.runner import Mirror
from mirror.verify import verify_route
from resize.worker import ResizeWorker
from xdc.app.airflow_support import ready_asset_name, release_payload
from xdc.config import XdcConfig
from xdc.errors import CacheError, ConfigError, LagObjectiveError
from xdc.events import RELEASE_TYPE, iso, parse_release
from xdc.observe import telemetry
from xdc.observe.lag import lag_over_objective, record_lag_snapshot
from xdc.topology import Site, Topology

log = logging.getLogger(__name__)


def observed(topo: Topology, component: str) -> telemetry.Telemetry:
    """A task's telemetry (traces, problem signatures), flushed when the task ends."""
    return telemetry.start(topo, f"airflow.{component}")


# -- prewarm --------------------------------------------------------------------------------------
def release_from_params(params: Mapping[str, Any], now: float | None = None) -> dict[str, Any] | None:
    """A release payload from a manual run's params (dataset, version, manifest, datacenters, and
    optionally prefix, select, root, make_room): validated as a release event is."""
    if not params.get("manifest"):
        return None
    doc = {"type": RELEASE_TYPE, "dataset": params.get("dataset") or "", "version": str(params.get("version") or ""),
           "manifest": params["manifest"], "time": iso(time.time() if now is None else now),
           "datacenters": list(params.get("datacenters") or [])}
    for name in ("prefix", "select", "root"):
        if params.get(name):
            doc[name] = params[name]
    if params.get("make_room"):
        doc["make_room"] = True
    return release_payload(doc)


def prewarm_units(cfg: XdcConfig, releases: list[dict[str, Any]],
                  owed: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One unit of prewarm work per (release, datacenter that wants it): {"release", "dc", "origin",
    "mode"}, plus the units `reconcile_units` found owed that no release of this run covers. Mode
    "warm": xdc loads the cache; "fluid": DataLoads are emitted for Fluid to load. Every unit is
    recorded as pending in its datacenter's release ledger."""
    units: list[dict[str, Any]] = []
    with Topology(cfg) as topo:
        for payload in releases:
            ev = parse_release(payload)
            names = list(ev.datacenters) or [s.name for s in topo.prewarm_sites()]
            for name in names:
                if wants(topo.site(name), ev):  # ConfigError for a datacenter the config does not know
                    units.append({"release": dict(payload), "dc": name, "origin": _dag_origin(payload)})
        taken = {(u["release"]["dataset"], str(u["release"]["version"]), u["dc"]) for u in units}
        units += [u for u in owed or [] if (u["release"]["dataset"], str(u["release"]["version"]), u["dc"]) not in taken]
        for u in units:
            ev = parse_release(u["release"])
            site = topo.site(u["dc"])
            u["mode"] = _mode(site)
            site.state.releases.seen(ev.dataset, ev.version, ev.to_dict(), u["origin"])
    return units


def _dag_origin(payload: Mapping[str, Any]) -> str:
    src = payload.get("source") or {}
    if src.get("topic"):  # from the release watcher: the Kafka delivery
        return f"dag:{src['topic']}[{src.get('partition')}]@{src.get('offset')}"
    return "dag:manual"


def reconcile_units(cfg: XdcConfig) -> list[dict[str, Any]]:
    """Units for the releases each prewarm datacenter has no result for (the releases topics
    against its ledger and registrations; see cache_client.prewarm.reconcile), past the grace
    period: what a release watcher lost, or a run that died before recording anything."""
    grace = cfg.prewarm.reconcile_after_seconds
    out = []
    with Topology(cfg) as topo:
        for site in topo.prewarm_sites():
            for owed in owed_releases(site):
                entry = site.state.releases.get(owed.release.dataset, owed.release.version)
                last = max(owed.published, entry.updated if entry is not None else 0.0)
                if time.time() - last < grace:
                    continue
                log.warning("release %s has no result in %s (%s): this run takes it", owed.label, site.name,
                            owed.origin)
                out.append({"release": owed.release.to_dict(), "dc": site.name, "origin": owed.origin})
    return out


def _mode(site: Site) -> str:
    return site.config.cache.mode if site.config.cache else "warm"


def units_in_mode(units: Iterable[Mapping[str, Any]], mode: str) -> list[dict[str, Any]]:
    """The units of one mode (the DAG warms "warm" units and emits "fluid" ones)."""
    return [dict(u) for u in units if u.get("mode", "warm") == mode]


def unit_label(unit: Mapping[str, Any]) -> str:
    r = unit["release"]
    return f"{r['dataset']}@{r['version']} in {unit['dc']}"


def _unit(cfg: XdcConfig, unit: Mapping[str, Any]) -> tuple[Topology, Site, pipeline.Request]:
    topo = Topology(cfg, unit["dc"])
    return topo, topo.here, request_of(parse_release(unit["release"]))


def unit_resolve(cfg: XdcConfig, unit: Mapping[str, Any]) -> dict[str, Any]:
    """Fetch and resolve the unit's file list once, and keep it in the datacenter's state."""
    topo, site, req = _unit(cfg, unit)
    with topo, observed(topo, "prewarm"):
        res = pipeline.resolve(site, req)
        pipeline.stage(site, req, res)
    log.info("resolved %s: %d files, %d entries rejected", unit_label(unit), len(res.files), res.rejected_count)
    return dict(unit) | {"files": len(res.files), "rejected": res.rejected_count}


def unit_ready(cfg: XdcConfig, unit: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """The ready gate: wait until every file of the unit exists in its datacenter."""
    topo, site, req = _unit(cfg, unit)
    with topo, observed(topo, "prewarm"):
        res = pipeline.load_staged(site, req)
        # a cache Fluid runs is not ours to ask: its datacenter's object store is
        stat = fluid.store_sizes(site) if unit.get("mode") == "fluid" else None
        pipeline.wait_ready(site, res.files, timeout, stat=stat)
    log.info("ready: %d files of %s are in the datacenter", len(res.files), unit_label(unit))
    return {"release": unit["release"], "dc": unit["dc"], "mode": unit.get("mode", "warm")}


def unit_plan(cfg: XdcConfig, unit: Mapping[str, Any]) -> dict[str, Any]:
    """The plan (files, bytes, per-node shares, ETA) of a unit: {"unit", "plan", "summary"}."""
    topo, site, req = _unit(cfg, unit)
    with topo, observed(topo, "prewarm"):  # with the release's make_room, room is made here, before the warm tasks start
        plan = pipeline.plan_files(site, pipeline.load_staged(site, req), make_room=req.make_room)
    log.info("plan %s: %s", unit_label(unit), plan.summary())
    return {"unit": dict(unit), "plan": plan.to_dict(max_files=100), "summary": plan.summary()}


def warm_jobs(plans: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One warm job per (unit, node) with something to load; nodes of a unit warm in parallel."""
    return [{"unit": p["unit"], "node": node}
            for p in plans for node, share in sorted(p["plan"]["nodes"].items()) if share["files"]]


def warm_node_job(cfg: XdcConfig, job: Mapping[str, Any]) -> dict[str, Any]:
    """Load one node's share of a unit. Planned again here (cheap), so a retried task loads only
    what is still missing. {"unit", "node", "files", "bytes", "seconds", "error"}."""
    unit, node = job["unit"], job["node"]
    topo, site, req = _unit(cfg, unit)
    with topo, observed(topo, "prewarm"):
        plan = pipeline.plan_files(site, pipeline.load_staged(site, req))
        result = pipeline.warm_node(site, plan, node)
    out = {"unit": dict(unit), **result.__dict__, "seconds": round(result.seconds, 3)}
    log.info("warm %s on %s: %d files, %.1f MiB in %.1fs%s", unit_label(unit), node, result.files,
             result.bytes / 2**20, result.seconds, f" (error: {result.error})" if result.error else "")
    return out


def unit_check(cfg: XdcConfig, unit: Mapping[str, Any], warms: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Verify a unit per file, re-warm what is missing, register the dataset version as active in
    the datacenter, and learn the bandwidth the parallel warm achieved. The PrewarmReport as a dict."""
    t0 = time.monotonic()
    topo, site, req = _unit(cfg, unit)
    mine = [w for w in warms if w["unit"]["dc"] == unit["dc"] and w["unit"]["release"] == unit["release"]]
    with topo, observed(topo, "prewarm"):
        pipeline.record_warm(site, [NodeWarmResult(w["node"], w["files"], w["bytes"], w["seconds"], w["error"])
                                    for w in mine])
        res = pipeline.load_staged(site, req)
        plan = pipeline.plan_files(site, res)
        rounds = [{"files": sum(w["files"] for w in mine), "bytes": sum(w["bytes"] for w in mine),
                   "seconds": max((w["seconds"] for w in mine), default=0.0),
                   "errors": {w["node"]: w["error"] for w in mine if w["error"]}}]
        check = pipeline.check_and_rewarm(site, res, plan, rounds)
        report = pipeline.finish(site, req, res, plan, rounds, check, time.monotonic() - t0)
        if req.dataset:
            site.state.releases.finish(req.dataset, req.version, "warm" if report.complete else "incomplete",
                                       report.summary())
        # the dataset.ready event on Kafka; a broker away only delays it (kept in the outbox), and the
        # Airflow asset event still goes out with this task's result
        pipeline.announce(site, strict=False)
    out = report.to_dict(max_files=100) | {"summary": report.summary(), "warm_nodes": mine}
    out["manifest"] = req.manifest
    return out


def ready_assets(check: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(asset name, extra) of the Airflow asset event a unit's check owes: one when the version
    became 100 % cached in its datacenter (`xdc-ready-<dataset>-<dc>`), else none."""
    ev = check.get("ready_event")
    if not ev:
        return []
    extra = {k: ev[k] for k in ("dataset", "version", "dc", "files", "bytes", "cached_ratio", "time", "manifest")}
    return [(ready_asset_name(ev["dataset"], ev["dc"]), extra)]


def unit_emit(cfg: XdcConfig, unit: Mapping[str, Any]) -> dict[str, Any]:
    """Write a fluid unit's DataLoads (its datacenter's cache.fluid, to cache.fluid.output) for
    Fluid's controller to load: {"dc", "dataset", "version", "dataloads", "files", "bytes", "uri"...}."""
    topo, site, req = _unit(cfg, unit)
    with topo:
        settings = fluid.settings_of(site)
        res = pipeline.load_staged(site, req)
        export = fluid.export_fluid(site, req, settings, res=res, sizes=fluid.store_sizes(site)(res.files))
        fluid.write_export(site, export, settings.output or "")
    log.info("%s", export.summary())
    return export.to_dict() | {"summary": export.summary()}


def prewarm_outcome(checks: Iterable[Mapping[str, Any]], emitted: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The prewarm DAG's report: one line per (release, datacenter); CacheError when any warmed
    one is not complete (the run fails, naming what is not cached and why). An emitted (Fluid)
    one is complete once its DataLoads are written (Fluid's controller loads them) and no list
    entry was rejected."""
    checks = list(checks)
    out = [{"dc": c["dc"], "dataset": c["dataset"], "version": c["version"], "complete": c["complete"],
            "cached_ratio": c["check"]["cached_ratio"], "files": c["check"]["files"],
            "not_cached_count": c["not_cached_count"], "seconds": c["seconds"], "summary": c["summary"]}
           for c in checks]
    emitted = list(emitted)
    out += [{"dc": e["dc"], "dataset": e["dataset"], "version": e["version"], "complete": not e["rejected_count"],
             "mode": "fluid",
             "files": e["files"], "dataloads": e["dataloads"], "uri": e["uri"], "summary": e["summary"]}
            for e in emitted]
    for o in out:
        log.info("%s", o["summary"])
    bad = [f"{c['dataset']}@{c['version']} in {c['dc']}: {c['not_cached_count']} not cached, e.g. "
           + ", ".join(f"{n.get('bucket_key') or n.get('entry')} ({n['reason']})" for n in c["not_cached"][:3])
           for c in checks if not c["complete"]]
    bad += [f"{e['dataset']}@{e['version']} in {e['dc']}: {e['rejected_count']} list entries not in any DataLoad, "
            "e.g. " + ", ".join(f"{entry} ({reason})" for entry, reason in e["rejected"][:3])
            for e in emitted if e["rejected_count"]]
    if bad:
        raise CacheError("prewarm incomplete: " + "; ".join(bad))
    return out


# -- free -----------------------------------------------------------------------------------------
def free_units(cfg: XdcConfig, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Free requests per datacenter from a manual run's params {dataset, version, manifest,
    datacenters, force}. Without a manifest, each datacenter's registration of the dataset (its
    latest active version, or `version`) names the manifest it was warmed from."""
    dataset, version = params.get("dataset") or None, str(params.get("version") or "")
    if not dataset and not params.get("manifest"):
        raise ConfigError("free: give a dataset or a manifest")
    units = []
    with Topology(cfg) as topo:
        sites = [topo.site(n) for n in params.get("datacenters") or []] or topo.prewarm_sites()
        for site in sites:
            manifest, ver = params.get("manifest"), version
            if not manifest:
                regs = [g for g in site.state.prewarm.registrations()
                        if g.dataset == dataset and (g.version == version or (not version and g.state == "active"))]
                if not regs:
                    log.warning("free: %s has no registration in %s; nothing to free there", dataset, site.name)
                    continue
                manifest, ver = regs[-1].manifest_uri, regs[-1].version
                if not manifest:
                    raise ConfigError(f"free: {dataset}@{ver} in {site.name} was registered without a manifest; pass one")
            units.append({"dc": site.name, "dataset": dataset, "version": ver, "manifest": manifest,
                          "force": bool(params.get("force"))})
    return units


def free_unit(cfg: XdcConfig, unit: Mapping[str, Any]) -> dict[str, Any]:
    """Evict a unit's list from every node of its datacenter's cache (reference-counted)."""
    with Topology(cfg, unit["dc"]) as topo, observed(topo, "free"):
        req = pipeline.Request(unit["manifest"], unit["dataset"], unit["version"])
        report = pipeline.free_list(topo.here, req, force=unit["force"])
    out = {"dc": unit["dc"], "dataset": unit["dataset"], "version": unit["version"], **report.to_dict(),
           "complete": report.complete, "summary": report.summary()}
    log.info("free in %s: %s", unit["dc"], out["summary"])
    return out


def free_outcome(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The free DAG's report; CacheError when bytes of the evicted files are still cached somewhere."""
    out = [dict(r) for r in results]
    left = {r["dc"]: r["left_bytes"] for r in out if not r["complete"]}
    if left:
        raise CacheError(f"free incomplete, bytes still cached per node: {left}")
    return out


# -- verify ---------------------------------------------------------------------------------------
def verify_routes(cfg: XdcConfig) -> list[str]:
    """Every route: one verify task each."""
    return [r.name for r in cfg.routes]


def verify_one(cfg: XdcConfig, route: str, repair: bool) -> dict[str, Any]:
    """Verify one route (source listing vs target listing), repairing what differs if asked:
    the VerifyReport as a dict (also recorded in the target's state for the dashboard)."""
    with Topology(cfg) as topo:
        rep = verify_route(topo, route, repair=repair, trigger="schedule")
    log.info("%s", rep.summary())
    for d in rep.sample:
        log.info("  %s %s source=%s target=%s", d["kind"], d["key"], d["source"], d["target"])
    return rep.to_dict()


def verify_outcome(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The verify DAG's summary: drift per route."""
    out = {r["route"]: {"drift": r["drift"], "missing": r["missing"], "extra": r["extra"], "differ": r["differ"],
                        "matched": r["matched"], "repaired": r["repaired"]} for r in reports}
    log.info("verify: %s", out)
    return out


# -- lag, mirror, resize ----------------------------------------------------------------------------
def lag_targets(cfg: XdcConfig) -> list[str]:
    """Datacenters with routes into them: one lag snapshot each."""
    return [s.name for s in Topology(cfg).mirror_targets()]


def lag_snapshot(cfg: XdcConfig, dc: str) -> dict[str, Any]:
    """Record one lag snapshot of every route into `dc` (the dashboard's rows): {"dc", "rows"}."""
    with Topology(cfg, dc) as topo, observed(topo, "lag"):
        rows = record_lag_snapshot(topo.here)
    for row in rows:
        log.info("lag %s: p99 %s s over %s events, consumer lag %s, pending %s objects", row["route"], row["p99"],
                 row["events"], row["consumer_lag"], row["pending_objects"])
    return {"dc": dc, "rows": rows}


def enforce_lag_objective(cfg: XdcConfig, snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Raise LagObjectiveError naming each route whose p99 lag is over the objective."""
    objective = cfg.lag.objective_p99_seconds
    rows = [r for s in snapshots for r in s["rows"]]
    if lag_over_objective(rows, objective):
        late = [f"{r['route']}: p99 {r['p99']:.3f}s" for r in rows if r.get("p99") is not None and r["p99"] > objective]
        raise LagObjectiveError(f"p99 replication lag over the {objective:g}s objective: " + "; ".join(late))
    return {"objective_p99_seconds": objective, "routes": len(rows),
            "worst_p99": max((r["p99"] for r in rows if r.get("p99") is not None), default=None)}


def mirror_into(cfg: XdcConfig, dc: str, max_seconds: float) -> dict[str, Any]:
    """One bounded mirror pass into `dc` (until caught up or `max_seconds`): MirrorStats as a dict."""
    with Topology(cfg, dc) as topo, observed(topo, "mirror"), Mirror(topo) as m:
        stats = m.run(once=True, max_seconds=max_seconds)
    out = {"dc": dc, **stats.to_dict()}
    log.info("mirror into %s: %d records, %d applied, %d dead letters, %.1f MiB in %.1fs", dc, stats.records,
             stats.applied, stats.dead_letters, stats.bytes_copied / 2**20, stats.seconds)
    return out


def resize_shards(cfg: XdcConfig, wanted: int) -> list[int]:
    """Shard numbers for the resize workers: at most one per partition of the events topic (more
    consumers than partitions in one group would sit idle), and one on a SQLite state (it takes
    one resize process)."""
    site = Topology(cfg).resize_site()
    most = site.config.kafka.partitions if site.takes_replicas else 1
    return list(range(max(1, min(int(wanted), most))))


def resize_shard(cfg: XdcConfig, shard: int, shards: int, max_seconds: float) -> dict[str, Any]:
    """One resize worker of the group (they share the events topic's partitions) until caught up.

    The shards share the machine's cores: each gets cores/shards resize processes.
    """
    workers = None
    if cfg.resize is not None and cfg.resize.workers == 0:
        workers = max(1, (os.cpu_count() or 1) // max(1, shards))
    with Topology(cfg) as topo, observed(topo, "resize"), ResizeWorker(topo, workers=workers) as w:
        stats = w.run(once=True, max_seconds=max_seconds)
    out = {"shard": shard, **stats.to_dict()}
    log.info("resize shard %d: %s", shard, out)
    return out


def sum_resize_stats(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The shards' ResizeStats dicts added up (frames, results by kind, bytes in/out)."""
    out: dict[str, Any] = {"shards": 0, "frames": 0, "results": {}, "bytes_in": 0, "bytes_out": 0}
    for r in results:
        out["shards"] += 1
        out["frames"] += r["frames"]
        out["bytes_in"] += r["bytes_in"]
        out["bytes_out"] += r["bytes_out"]
        for k, v in r["results"].items():
            out["results"][k] = out["results"].get(k, 0) + v
    out["ratio"] = round(out["bytes_in"] / out["bytes_out"], 2) if out["bytes_out"] else None
    log.info("resize: %s", out)
    return out
