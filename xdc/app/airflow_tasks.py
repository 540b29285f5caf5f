"""What the project's DAGs (dags/) call: each task is one of these functions.

The DAG files only wire them into tasks; each takes and returns plain, JSON-able values (XCom), so
a task's inputs and outputs are readable in the UI and the logic is tested without Airflow. The
prewarm tasks are the phases of the one pipeline (cache_client.prewarm.pipeline): the file list is
fetched and resolved once per (release, datacenter) by `unit_resolve`, kept in that datacenter's
state, and the later tasks read it from there.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from cache_client.base import NodeWarmResult
from cache_client.prewarm import pipeline
from cache_client.prewarm.release import request_of, wants
from mirror.runner import Mirror
from resize.worker import ResizeWorker
from xdc.app.airflow_support import release_payload
from xdc.config import XdcConfig
from xdc.errors import CacheError, ConfigError, LagObjectiveError
from xdc.events import RELEASE_TYPE, iso, parse_release
from xdc.observe.lag import lag_over_objective, record_lag_snapshot
from xdc.topology import Site, Topology

log = logging.getLogger(__name__)


# -- prewarm --------------------------------------------------------------------------------------
def release_from_params(params: Mapping[str, Any], now: float | None = None) -> dict[str, Any] | None:
    """A release payload from a manual run's params (dataset, version, manifest, datacenters)."""
    if not params.get("manifest"):
        return None
    doc = {"type": RELEASE_TYPE, "dataset": params.get("dataset") or "", "version": str(params.get("version") or ""),
           "manifest": params["manifest"], "time": iso(time.time() if now is None else now),
           "datacenters": list(params.get("datacenters") or [])}
    if params.get("prefix"):
        doc["prefix"] = params["prefix"]
    return release_payload(doc)


def prewarm_units(cfg: XdcConfig, releases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One unit of prewarm work per (release, datacenter that wants it): {"release", "dc"}."""
    topo = Topology(cfg)
    units = []
    for payload in releases:
        ev = parse_release(payload)
        names = list(ev.datacenters) or [s.name for s in topo.prewarm_sites()]
        for name in names:
            if wants(topo.site(name), ev):  # ConfigError for a datacenter the config does not know
                units.append({"release": dict(payload), "dc": name})
    return units


def unit_label(unit: Mapping[str, Any]) -> str:
    r = unit["release"]
    return f"{r['dataset']}@{r['version']} in {unit['dc']}"


def _unit(cfg: XdcConfig, unit: Mapping[str, Any]) -> tuple[Topology, Site, pipeline.Request]:
    topo = Topology(cfg, unit["dc"])
    return topo, topo.here, request_of(parse_release(unit["release"]))


def unit_resolve(cfg: XdcConfig, unit: Mapping[str, Any]) -> dict[str, Any]:
    """Fetch and resolve the unit's file list once, and keep it in the datacenter's state."""
    topo, site, req = _unit(cfg, unit)
    with topo:
        res = pipeline.resolve(site, req)
        pipeline.stage(site, req, res)
    log.info("resolved %s: %d files, %d entries rejected", unit_label(unit), len(res.files), res.rejected_count)
    return dict(unit) | {"files": len(res.files), "rejected": res.rejected_count}


def unit_ready(cfg: XdcConfig, unit: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """The ready gate: wait until every file of the unit exists in its datacenter."""
    topo, site, req = _unit(cfg, unit)
    with topo:
        res = pipeline.load_staged(site, req)
        pipeline.wait_ready(site, res.files, timeout)
    log.info("ready: %d files of %s are in the datacenter", len(res.files), unit_label(unit))
    return {"release": unit["release"], "dc": unit["dc"]}


def unit_plan(cfg: XdcConfig, unit: Mapping[str, Any]) -> dict[str, Any]:
    """The plan (files, bytes, per-node shares, ETA) of a unit: {"unit", "plan", "summary"}."""
    topo, site, req = _unit(cfg, unit)
    with topo:
        plan = pipeline.plan_files(site, pipeline.load_staged(site, req))
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
    with topo:
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
    with topo:
        pipeline.record_warm(site, [NodeWarmResult(w["node"], w["files"], w["bytes"], w["seconds"], w["error"])
                                    for w in mine])
        res = pipeline.load_staged(site, req)
        plan = pipeline.plan_files(site, res)
        rounds = [{"files": sum(w["files"] for w in mine), "bytes": sum(w["bytes"] for w in mine),
                   "seconds": max((w["seconds"] for w in mine), default=0.0),
                   "errors": {w["node"]: w["error"] for w in mine if w["error"]}}]
        check = pipeline.check_and_rewarm(site, res, plan, rounds)
        report = pipeline.finish(site, req, res, plan, rounds, check, time.monotonic() - t0)
    out = report.to_dict(max_files=100) | {"summary": report.summary(), "warm_nodes": mine}
    out["manifest"] = req.manifest
    return out


def prewarm_outcome(checks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The prewarm DAG's report: one line per (release, datacenter); CacheError when any is not
    complete (the run fails, naming what is not cached and why)."""
    checks = list(checks)
    out = [{"dc": c["dc"], "dataset": c["dataset"], "version": c["version"], "complete": c["complete"],
            "cached_ratio": c["check"]["cached_ratio"], "files": c["check"]["files"],
            "not_cached_count": c["not_cached_count"], "seconds": c["seconds"], "summary": c["summary"]}
           for c in checks]
    for o in out:
        log.info("%s", o["summary"])
    bad = [c for c in checks if not c["complete"]]
    if bad:
        raise CacheError("prewarm incomplete: " + "; ".join(
            f"{c['dataset']}@{c['version']} in {c['dc']}: {c['not_cached_count']} not cached, e.g. "
            + ", ".join(f"{n.get('bucket_key') or n.get('entry')} ({n['reason']})" for n in c["not_cached"][:3])
            for c in bad))
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
    with Topology(cfg, unit["dc"]) as topo:
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


# -- lag, mirror, resize ----------------------------------------------------------------------------
def lag_targets(cfg: XdcConfig) -> list[str]:
    """Datacenters with routes into them: one lag snapshot each."""
    return [s.name for s in Topology(cfg).mirror_targets()]


def lag_snapshot(cfg: XdcConfig, dc: str) -> dict[str, Any]:
    """Record one lag snapshot of every route into `dc` (the dashboard's rows): {"dc", "rows"}."""
    with Topology(cfg, dc) as topo:
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
    with Topology(cfg, dc) as topo, Mirror(topo) as m:
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
    with Topology(cfg) as topo, ResizeWorker(topo, workers=workers) as w:
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
