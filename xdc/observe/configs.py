"""The config centre's history: which config each process runs, versions over time, diffs.

A version is identified by the hash of the config as validated (`config_hash`): everything but
where the file lies, which datacenter the process runs in and the run directory, so a mirror in
IDC-B and a resize worker in IDC-A on the same file share a version. What is kept is the masked
view (`xdc.topology.masked_view`: secrets are references, resolved values masked). The impact
preview of a proposed config is in `xdc.observe.impact`.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from xdc.config import XdcConfig, load_config
from xdc.errors import ConfigError
from xdc.topology import Topology, masked_view

LIVE_S = 90.0  # a process seen within this is running (heartbeat every 30 s)


def config_hash(cfg: XdcConfig) -> str:
    data = cfg.model_dump(mode="json", exclude={"base_dir", "local_dc", "run_dir"})
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_body(topology: Topology) -> dict[str, Any]:
    """The masked view, without what depends on the process's vantage point."""
    body = masked_view(topology)
    body["local_dc"] = None
    body.pop("run_dir", None)
    for d in body["datacenters"].values():
        d["s3"].pop("url_used_here", None)
    return body


def short(h: str) -> str:
    return h[:12]


# -- history --------------------------------------------------------------------------------------
def history(topology: Topology, *, limit: int = 50) -> list[dict[str, Any]]:
    """Config versions seen in every datacenter's state, newest first, with their processes."""
    now = time.time()
    out: dict[str, dict[str, Any]] = {}
    for site in topology.sites:
        state = site.state
        for v in state.configs.versions(limit):
            row = out.setdefault(v["hash"], {"hash": v["hash"], "first_seen": v["first_seen"], "last_seen": None,
                                             "processes": 0, "running": 0, "datacenters": []})
            row["first_seen"] = min(row["first_seen"], v["first_seen"])
            if v["last_seen"] is not None:
                row["last_seen"] = max(row["last_seen"] or 0.0, v["last_seen"])
            row["processes"] += int(v["processes"] or 0)
            row["datacenters"].append(site.name)
        for p in running_processes(state.configs.processes(now - LIVE_S), now):
            if p["config_hash"] in out:
                out[p["config_hash"]]["running"] += 1
    return sorted(out.values(), key=lambda r: -r["first_seen"])[:limit]


def running_processes(rows: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    return [p for p in rows if p["stopped_at"] is None and now - p["last_seen"] <= LIVE_S]


def processes(topology: Topology, *, now: float | None = None) -> dict[str, Any]:
    """Processes running now in every datacenter and the config version each runs; `mixed` when
    they do not all run the same one (the dashboard flags it)."""
    now = time.time() if now is None else now
    rows: list[dict[str, Any]] = []
    for site in topology.sites:
        for p in running_processes(site.state.configs.processes(now - LIVE_S), now):
            rows.append({**p, "config": short(p["config_hash"])})
    versions = sorted({p["config_hash"] for p in rows})
    live = config_hash(topology.config)
    for p in rows:
        p["current"] = p["config_hash"] == live
    return {"processes": rows, "running_versions": [short(v) for v in versions], "mixed": len(versions) > 1,
            "file_version": short(live)}


# -- diff -----------------------------------------------------------------------------------------
def resolve_version(topology: Topology, ref: str) -> tuple[str, dict[str, Any]]:
    """A config by hash (a prefix, from any datacenter's state) or by file path -> (label, body)."""
    path = Path(ref)
    if path.is_file():
        cfg = load_config(path, allow_bucket_collisions=True)
        topo = Topology(cfg, topology.here_name if topology.here_name in cfg.datacenters else None)
        return f"{ref} ({short(config_hash(cfg))})", config_body(topo)
    for site in topology.sites:
        try:
            got = site.state.configs.body(ref)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if got is not None:
            return short(got[0]), got[1]
    raise ConfigError(f"{ref!r} is neither a file nor a config hash recorded in any datacenter's state")


def diff(topology: Topology, a: str, b: str) -> str:
    """A unified diff of two configs' masked views (YAML), by hash or file."""
    la, ba = resolve_version(topology, a)
    lb, bb = resolve_version(topology, b)
    ya = yaml.safe_dump(ba, sort_keys=True).splitlines(keepends=True)
    yb = yaml.safe_dump(bb, sort_keys=True).splitlines(keepends=True)
    return "".join(difflib.unified_diff(ya, yb, fromfile=la, tofile=lb))
