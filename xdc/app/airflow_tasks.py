"""What the project's DAGs (dags/) call: each task is one of these functions.

The DAG files only wire them into tasks; each takes and returns plain, JSON-able values (XCom), so
a task's inputs and outputs are readable in the UI and the logic is tested without Airflow.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from xdc.app.airflow_support import config_path, release_payload

if TYPE_CHECKING:
    from xdc.config import XdcConfig

log = logging.getLogger(__name__)

DEFAULT_KAFKA_CONN_ID = "xdc_kafka"
DEFAULT_SCHEDULE = "* * * * *"  # every minute


def load_xdc_config(path: str | None = None) -> XdcConfig:
    """The XdcConfig the DAGs run with: `path`, else config_path(); the local stack's generated
    credentials (a secrets file beside the config) are put into the environment first."""
    from pathlib import Path

    from xdc.config import load_config
    from devtools.stack import load_secrets

    path = path or config_path()
    load_secrets(Path(path).resolve().parent)
    return load_config(path)


def parse_time_config() -> XdcConfig | None:
    """The config for building DAG structure at parse time, or None when it cannot be read.

    A DAG file must import without a config (CI, a fresh Airflow): its tasks then fail at run time
    with the ConfigError, which names what to set.
    """
    try:
        return load_xdc_config()
    except Exception as exc:  # noqa: BLE001 - any reason: fall back to the config-less DAG shape
        log.info("xdc config not readable while parsing DAGs (%s); using the config-less shape", exc)
        return None


def schedule_from_env(name: str, default: str = DEFAULT_SCHEDULE) -> str | None:
    """A DAG's cron schedule from env `name` ("none"/"manual" -> no schedule)."""
    value = os.environ.get(name, default).strip()
    return None if value.lower() in ("", "none", "manual") else value


def mirror_targets(cfg: XdcConfig) -> list[str]:
    """Datacenters some route mirrors into: one mirror task (and asset) each."""
    return sorted({r.target.dc for r in cfg.routes})


def dc_asset_name(dc: str) -> str:
    """The asset a mirror task updates when it applied objects into `dc`."""
    return f"xdc-dc-{dc}"


def release_watch(cfg: XdcConfig) -> tuple[list[str], str]:
    """(releases topics, kafka connection id) the release watcher listens to.

    One connection = one broker: the local datacenter's (or the first one's); the releases topics
    of every datacenter whose Kafka is that broker.
    """
    local = cfg.local_dc or next(iter(cfg.datacenters))
    k = cfg.dc(local).kafka
    conn_id = k.airflow_conn_id or DEFAULT_KAFKA_CONN_ID
    same = [d.kafka.topics.releases for d in cfg.datacenters.values()
            if sorted(d.kafka.bootstrap_servers) == sorted(k.bootstrap_servers)]
    return sorted(set(same)), conn_id


def release_from_params(params: Mapping[str, Any], now: float | None = None) -> dict[str, Any] | None:
    """A release payload from a manual run's params (dataset, version, manifest, datacenters)."""
    import time

    from xdc.events import RELEASE_TYPE, iso

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
    from cache_client.prewarm.release import wants
    from xdc.events import parse_release

    units = []
    for payload in releases:
        ev = parse_release(payload)
        for dc in cfg.prewarm_datacenters() if not ev.datacenters else list(ev.datacenters):
            cfg.dc(dc)  # ConfigError for a datacenter the config does not know
            if wants(cfg, dc, ev):
                units.append({"release": dict(payload), "dc": dc})
    return units


def unit_label(unit: Mapping[str, Any]) -> str:
    r = unit["release"]
    return f"{r['dataset']}@{r['version']} in {unit['dc']}"


class _Manifest:
    """Context manager: the release's file list as a local path (fetched from S3 when s3://)."""

    def __init__(self, cfg: XdcConfig, unit: Mapping[str, Any]) -> None:
        self.cfg, self.unit = cfg, unit
        self._tmp: Any = None

    def __enter__(self) -> str:
        import tempfile
        from pathlib import Path

        from cache_client.prewarm.release import fetch_manifest

        self._tmp = tempfile.TemporaryDirectory(prefix="xdc-manifest-")
        return str(fetch_manifest(self.cfg, self.unit["dc"], self.unit["release"]["manifest"], Path(self._tmp.name)))

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def manifest_of(cfg: XdcConfig, unit: Mapping[str, Any]) -> _Manifest:
    return _Manifest(cfg, unit)


def unit_ready(cfg: XdcConfig, unit: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """The ready gate: wait until every file of the release exists in the unit's datacenter."""
    from cache_client.prewarm.pipeline import cluster_for, resolve_list, wait_for_files

    dc = unit["dc"]
    cfg = cfg.with_local_dc(dc)
    cluster = cluster_for(cfg, dc)
    with manifest_of(cfg, unit) as path:
        res = resolve_list(cfg, dc, path, prefix=unit["release"].get("prefix"), cluster=cluster)
    wait_for_files(cluster, res.files, cfg.prewarm.ready_timeout_seconds if timeout is None else timeout,
                   cfg.prewarm.ready_poll_seconds)
    log.info("ready: %d files of %s are in the datacenter", len(res.files), unit_label(unit))
    return dict(unit)


def unit_plan(cfg: XdcConfig, unit: Mapping[str, Any]) -> dict[str, Any]:
    """The plan (files, bytes, per-node shares, ETA) of a unit: {"unit", "plan", "summary"}."""
    from cache_client.prewarm.pipeline import plan_prewarm

    dc = unit["dc"]
    with manifest_of(cfg, unit) as path:
        plan = plan_prewarm(cfg.with_local_dc(dc), dc, path, prefix=unit["release"].get("prefix"))
    summary = plan.summary()
    log.info("plan %s: %s", unit_label(unit), summary)
    return {"unit": dict(unit), "plan": plan.to_dict(max_files=100), "summary": summary}


def warm_jobs(plans: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One warm job per (unit, node) with something to load; nodes of a unit warm in parallel."""
    return [{"unit": p["unit"], "node": node}
            for p in plans for node, share in sorted(p["plan"]["nodes"].items()) if share["files"]]


def warm_node_job(cfg: XdcConfig, job: Mapping[str, Any]) -> dict[str, Any]:
    """Load one node's share of a unit into that node's cache: {"unit", "node", "files", "bytes",
    "seconds", "error"}. Planned again here (cheap), so it loads only what is still missing."""
    import time

    from cache_client.prewarm.pipeline import cluster_for, resolve_list

    unit, node = job["unit"], job["node"]
    dc = unit["dc"]
    cfg = cfg.with_local_dc(dc)
    cluster = cluster_for(cfg, dc)
    with manifest_of(cfg, unit) as path:
        res = resolve_list(cfg, dc, path, prefix=unit["release"].get("prefix"), cluster=cluster)
    share = cluster.plan(res.files).shares[node]
    t0 = time.monotonic()
    error = None
    if share.files:
        try:
            cluster.warm_node(node, share.files, cluster.threads_per_node, lambda files, nbytes: None)
        except Exception as exc:  # noqa: BLE001 - reported; the check step re-warms what is missing
            error = str(exc)
    out = {"unit": dict(unit), "node": node, "files": len(share.files), "bytes": share.bytes,
           "seconds": round(time.monotonic() - t0, 3), "error": error}
    log.info("warm %s on %s: %d files, %.1f MiB in %.1fs%s", unit_label(unit), node, out["files"],
             share.bytes / 2**20, out["seconds"], f" (error: {error})" if error else "")
    return out


def unit_check(cfg: XdcConfig, unit: Mapping[str, Any], warms: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Verify a unit per file, re-warm what is missing (run_prewarm's rounds), register the dataset
    version as active in the datacenter, and record the bandwidth the parallel warm achieved.

    Returns the PrewarmReport as a dict (+ "summary" and "warm_nodes").
    """
    from cache_client.prewarm.pipeline import run_prewarm, state_for

    dc = unit["dc"]
    cfg = cfg.with_local_dc(dc)
    mine = [w for w in warms if w["unit"] == unit]
    nbytes, nfiles = sum(w["bytes"] for w in mine), sum(w["files"] for w in mine)
    seconds = max((w["seconds"] for w in mine), default=0.0)  # the nodes warmed in parallel
    if nbytes and seconds > 0 and not any(w["error"] for w in mine):
        state_for(cfg, dc).record_run(dc, nbytes, nfiles, seconds, nodes=len(mine))
    r = unit["release"]
    with manifest_of(cfg, unit) as path:
        report = run_prewarm(cfg, dc, path, r["dataset"], version=r["version"], prefix=r.get("prefix"),
                             wait=False)
    out = report.to_dict(max_files=100) | {"summary": report.summary(), "warm_nodes": mine}
    out["manifest"] = r["manifest"]
    log.info("%s", out["summary"])
    return out


def free_units(cfg: XdcConfig, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Free requests per datacenter from a manual run's params {dataset, version, manifest,
    datacenters, force}. Without a manifest, each datacenter's registration of the dataset (its
    latest active version, or `version`) names the manifest it was warmed from."""
    from cache_client.prewarm.pipeline import state_for
    from xdc.errors import ConfigError

    dataset, version = params.get("dataset") or None, str(params.get("version") or "")
    if not dataset and not params.get("manifest"):
        raise ConfigError("free: give a dataset or a manifest")
    dcs = list(params.get("datacenters") or cfg.prewarm_datacenters())
    units = []
    for dc in dcs:
        cfg.dc(dc)
        manifest, ver = params.get("manifest"), version
        if not manifest:
            regs = [g for g in state_for(cfg, dc).registrations(dc)
                    if g.dataset == dataset and (g.version == version or (not version and g.state == "active"))]
            if not regs:
                log.warning("free: %s has no registration in %s; nothing to free there", dataset, dc)
                continue
            manifest, ver = regs[-1].manifest_uri, regs[-1].version
            if not manifest:
                raise ConfigError(f"free: {dataset}@{ver} in {dc} was registered without a manifest; pass one")
        units.append({"dc": dc, "dataset": dataset, "version": ver, "manifest": manifest,
                      "force": bool(params.get("force"))})
    return units


def free_unit(cfg: XdcConfig, unit: Mapping[str, Any]) -> dict[str, Any]:
    """Evict a unit's list from every node of its datacenter's cache (reference-counted)."""
    from cache_client.prewarm.pipeline import free_list

    dc = unit["dc"]
    cfg = cfg.with_local_dc(dc)
    release = {"manifest": unit["manifest"]}
    with manifest_of(cfg, {"dc": dc, "release": release}) as path:
        report = free_list(cfg, dc, path, unit["dataset"], version=unit["version"], force=unit["force"])
    out = {"dc": dc, "dataset": unit["dataset"], "version": unit["version"], **report.to_dict(),
           "complete": report.complete, "summary": report.summary()}
    log.info("free in %s: %s", dc, out["summary"])
    return out


def lag_targets(cfg: XdcConfig) -> list[str]:
    """Datacenters with routes into them: one lag snapshot each."""
    return mirror_targets(cfg)


def lag_snapshot(cfg: XdcConfig, dc: str) -> dict[str, Any]:
    """Record one lag snapshot of every route into `dc` (the dashboard's rows): {"dc", "rows"}."""
    from xdc.observe.lag import record_lag_snapshot

    rows = record_lag_snapshot(cfg.with_local_dc(dc), dc)
    for row in rows:
        log.info("lag %s: p99 %s s over %s events, consumer lag %s, pending %s objects", row["route"], row["p99"],
                 row["events"], row["consumer_lag"], row["pending_objects"])
    return {"dc": dc, "rows": rows}


def enforce_lag_objective(cfg: XdcConfig, snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Raise LagObjectiveError naming each route whose p99 lag is over the objective."""
    from xdc.errors import LagObjectiveError
    from xdc.observe.lag import lag_over_objective

    objective = cfg.lag.objective_p99_seconds
    rows = [r for s in snapshots for r in s["rows"]]
    if lag_over_objective(rows, objective):
        late = [f"{r['route']}: p99 {r['p99']:.3f}s" for r in rows if r.get("p99") is not None and r["p99"] > objective]
        raise LagObjectiveError(f"p99 replication lag over the {objective:g}s objective: " + "; ".join(late))
    return {"objective_p99_seconds": objective, "routes": len(rows),
            "worst_p99": max((r["p99"] for r in rows if r.get("p99") is not None), default=None)}


def mirror_into(cfg: XdcConfig, dc: str, max_seconds: float) -> dict[str, Any]:
    """One bounded mirror pass into `dc` (until caught up or `max_seconds`): MirrorStats as a dict."""
    from mirror.runner import Mirror

    with Mirror(cfg, dc) as m:
        stats = m.run(once=True, max_seconds=max_seconds)
    out = {"dc": dc, **stats.to_dict()}
    log.info("mirror into %s: %d records, %d applied, %d dead letters, %.1f MiB in %.1fs", dc, stats.records,
             stats.applied, stats.dead_letters, stats.bytes_copied / 2**20, stats.seconds)
    return out


def resize_shards(cfg: XdcConfig, wanted: int) -> list[int]:
    """Shard numbers for the resize workers: at most one per partition of the events topic
    (more consumers than partitions in one group would sit idle)."""
    from xdc.errors import ConfigError

    if cfg.resize is None:
        raise ConfigError("no resize: section in the config")
    dc = cfg.resize.dc or cfg.require_local_dc()
    return list(range(max(1, min(int(wanted), cfg.dc(dc).kafka.partitions))))


def resize_shard(cfg: XdcConfig, shard: int, shards: int, max_seconds: float) -> dict[str, Any]:
    """One resize worker of the group (they share the events topic's partitions) until caught up.

    The shards share the machine's cores: each gets cores/shards resize processes.
    """
    from resize.worker import ResizeWorker

    settings = cfg.resize
    if settings is not None and settings.workers == 0:
        per = max(1, (os.cpu_count() or 1) // max(1, shards))
        cfg = cfg.model_copy(update={"resize": settings.model_copy(update={"workers": per})})
    with ResizeWorker(cfg) as w:
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


def prewarm_outcome(checks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The prewarm DAG's report: one line per (release, datacenter); CacheError when any is not
    complete (the run fails, naming what is not cached and why)."""
    from xdc.errors import CacheError

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


def free_outcome(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The free DAG's report; CacheError when bytes of the evicted files are still cached somewhere."""
    from xdc.errors import CacheError

    out = [dict(r) for r in results]
    left = {r["dc"]: r["left_bytes"] for r in out if not r["complete"]}
    if left:
        raise CacheError(f"free incomplete, bytes still cached per node: {left}")
    return out
