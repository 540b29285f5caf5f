"""The operator's dashboard: one self-refreshing page over every datacenter's catalog.

``serve_dashboard`` serves it on the metrics HTTP server (``/`` the page, ``/api/state`` the JSON
it polls every few seconds, ``/api/ready`` which dataset versions are 100 % cached where, for
training pipelines, plus /metrics, /healthz, /readyz); ``snapshot_html`` renders the same page
with the state embedded, for a file left in a run directory. The page is plain HTML, CSS and
JavaScript in ``dashboard.html`` (inline SVG charts): nothing is fetched from anywhere else.

The state is read from each datacenter's state only (lag snapshots, objects, each route's last
verify, dead letters, quarantine, offset gaps, two-way conflicts, prewarm records), never from Kafka or S3, so a refresh is cheap: consumer lag and backlog are as of
the latest lag snapshot (``xdc lag snapshot``, ``xdc.observe.lag.record_lag_snapshot``).

Also from the state: the processes running and the config version each runs (flagged when they
differ), the log signatures newest first (new kinds of problems), and one object's trace as a
waterfall (``/api/trace?key=bucket/key``; a snapshot embeds the most recently traced object's).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from importlib import resources
from typing import Any

from xdc.errors import XdcError
from xdc.observe import configs
from xdc.observe.http import ServerHandle, serve
from xdc.observe.problems import list_problems
from xdc.observe.timeline import timeline
from xdc.topology import Site, Topology

# A day of snapshots every 30 s is 2,880 points per route: draw at most this many.
MAX_POINTS = 360
RECENT = 20  # dead letters / quarantined objects listed per datacenter
TRACED_KEYS = 10  # recently traced objects offered by the trace panel
_STATE_MARK = "/*__XDC_STATE__*/null"


# -- state (pure reads of each datacenter's state) -----------------------------------------------------
def downsample(history: list[list[float | None]], max_points: int = MAX_POINTS) -> list[list[float | None]]:
    """[[t, p50, p99], ...] -> at most max_points, keeping the worst (max) lags of each time bucket
    so a short spike never disappears from the chart."""
    if len(history) <= max_points:
        return history
    t0, t1 = history[0][0] or 0.0, history[-1][0] or 0.0
    width = (t1 - t0) / max_points or 1.0
    buckets: dict[int, list[float | None]] = {}
    for t, p50, p99 in history:
        i = min(max_points - 1, int(((t or 0.0) - t0) / width))
        b = buckets.get(i)
        if b is None:
            buckets[i] = [t, p50, p99]
        else:
            b[0] = t
            b[1] = _max(b[1], p50)
            b[2] = _max(b[2], p99)
    return [buckets[i] for i in sorted(buckets)]


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _prewarm_datasets(site: Site, readiness: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The site's dataset registrations merged with their progress rows and the registered
    version's readiness (since when it is 100 % cached here), per dataset."""
    out: dict[str, dict[str, Any]] = {}
    for g in site.state.prewarm.registrations():
        out[g.dataset] = {"dataset": g.dataset, "version": g.version, "state": g.state}
    for p in site.state.prewarm.progress():
        d = out.setdefault(p["dataset"], {"dataset": p["dataset"], "version": None, "state": None})
        d.update({k: p[k] for k in ("files_done", "files_total", "bytes_done", "bytes_total", "eta_s",
                                    "cached_ratio", "ready", "updated")})
    ready = {(r["dataset"], r["version"]): r for r in readiness}
    for d in out.values():
        r = ready.get((d["dataset"], d["version"]))
        d["ready_since"] = r["ready_at"] if r and r["ready"] else None
    return sorted(out.values(), key=lambda d: d["dataset"])


def _cache_nodes(site: Site) -> list[dict[str, Any]]:
    """Each cache node's fill against its watermarks, as the last plan, warm or free saw it."""
    return [{"node": n.node, "used": n.used, "capacity": n.capacity,
             "fill": n.used / n.capacity if n.capacity else None, "high_watermark": n.high_watermark,
             "low_watermark": n.low_watermark, "updated": n.updated} for n in site.state.prewarm.nodes()]


def ready_rows(topology: Topology) -> list[dict[str, Any]]:
    """Every checked dataset version in every datacenter: ready (100 % cached) or not, and since when."""
    keep = ("dataset", "version", "ready", "files", "bytes", "cached_ratio", "ready_at", "checked_at", "manifest_uri")
    return [{"dc": site.name, **{k: r[k] for k in keep}} for site in topology.sites
            for r in site.state.prewarm.readiness()]


def dc_state(site: Site, now: float) -> dict[str, Any]:
    cfg = site.topology.config
    state = site.state
    totals = state.catalog.counts()
    by_route = state.catalog.route_totals()
    latest = {r["route"]: r for r in state.lag.latest()}
    verified = state.verify.latest()
    hist: dict[str, list[list[float | None]]] = {}
    for r in state.lag.history(now - cfg.lag.retention_hours * 3600):
        hist.setdefault(r["route"], []).append([r["time"], r["p50"], r["p99"]])
    routes = []
    names = [r.name for r in site.routes_in]
    names += sorted((set(by_route) | set(latest)) - set(names))  # routes no longer configured
    conf = {r.name: r for r in cfg.routes}
    for name in names:
        r = conf.get(name)
        routes.append({
            "name": name,
            "source": f"{r.source.dc}:{r.source.bucket}/{r.source.prefix}" if r else None,
            "target": f"{r.target.dc}:{r.target.bucket}/{r.target.prefix}" if r else None,
            "mode": r.mode if r else None,
            **by_route.get(name, {"objects": 0, "bytes": 0, "tombstones": 0}),
            "latest": latest.get(name),
            "verify": _verify_summary(verified.get(name)),
            "history": downsample(hist.get(name, [])),
        })
    readiness = state.prewarm.readiness()
    return {"name": site.name, "catalog": site.state.describe(), "totals": totals, "routes": routes,
            "dead_letters": state.incidents.recent("dead_letters", RECENT),
            "quarantine": state.incidents.recent("quarantine", RECENT),
            "gaps": state.incidents.recent("gaps", RECENT), "conflicts": state.incidents.recent("conflicts", RECENT),
            "datasets": _prewarm_datasets(site, readiness), "readiness": readiness,
            "cache_nodes": _cache_nodes(site), "evictions": state.prewarm.evictions(RECENT)}


def _verify_summary(run: dict[str, Any] | None) -> dict[str, Any] | None:
    """A route's last verify as the page shows it (the run's first differences stay in the state)."""
    if run is None:
        return None
    keys = ("finished", "trigger", "source_listed", "target_listed", "missing", "extra", "differ", "matched",
            "errors", "repaired")
    return {k: run[k] for k in keys} | {"drift": run["missing"] + run["extra"] + run["differ"]}


def dashboard_state(topology: Topology, *, now: float | None = None) -> dict[str, Any]:
    """Everything the page shows, for every datacenter of the config."""
    cfg = topology.config
    now = time.time() if now is None else now
    dcs = [dc_state(site, now) for site in topology.sites]
    latest = [r["latest"] for d in dcs for r in d["routes"] if r["latest"]]
    p99s = [x["p99"] for x in latest if x["p99"] is not None]
    # Routes from one source datacenter share its events topic, hence its consumer lag: count once.
    source = {r.name: r.source.dc for r in cfg.routes}
    topic_lag: dict[tuple[str, str], int] = {}
    for d in dcs:
        for r in d["routes"]:
            if r["latest"]:
                k = (d["name"], source.get(r["name"], r["name"]))
                topic_lag[k] = max(topic_lag.get(k, 0), r["latest"]["consumer_lag"] or 0)
    return {
        "generated": now,
        "objective_p99_s": cfg.lag.objective_p99_seconds,
        "window_s": cfg.lag.window_seconds,
        "retention_h": cfg.lag.retention_hours,
        "totals": {
            "objects": sum(d["totals"]["objects"] for d in dcs),
            "bytes": sum(d["totals"]["bytes"] for d in dcs),
            "events_window": sum(x["events"] for x in latest),
            "worst_p99": max(p99s) if p99s else None,
            "consumer_lag": sum(topic_lag.values()),
            "pending_objects": sum(x["pending_objects"] or 0 for x in latest),
            "pending_bytes": sum(x["pending_bytes"] or 0 for x in latest),
            "dead_letters": sum(len(d["dead_letters"]) for d in dcs),
        },
        "datacenters": dcs,
        "processes": configs.processes(topology, now=now),
        "problems": list_problems(topology, limit=RECENT, now=now),
        "traced_keys": traced_keys(topology),
    }


def traced_keys(topology: Topology) -> list[dict[str, Any]]:
    """The objects traced most recently, in any datacenter."""
    rows = [{**r, "dc": s.name} for s in topology.sites for r in s.state.traces.recent_keys(TRACED_KEYS)]
    return sorted(rows, key=lambda r: -r["last"])[:TRACED_KEYS]


def trace_state(topology: Topology, key: str, dc: str | None = None) -> dict[str, Any] | None:
    tl = timeline(topology, key, dc=dc or None)
    return None if tl is None else tl.to_dict()


# -- HTML ---------------------------------------------------------------------------------------
def _template() -> str:
    return resources.files("xdc.observe").joinpath("dashboard.html").read_text(encoding="utf-8")


def _embed(state: dict[str, Any] | None) -> str:
    page = _template()
    if state is None:  # served: the page fetches /api/state itself
        return page.replace(_STATE_MARK, "null", 1)
    # JSON inside <script>: "</" would end the element early, so it is escaped.
    data = json.dumps(state, allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")
    return page.replace(_STATE_MARK, data, 1)


def snapshot_html(topology: Topology) -> str:
    """The page with the current state embedded (and the most recently traced object's trace): a
    static file that needs no server."""
    state = dashboard_state(topology)
    keys = state["traced_keys"]
    state["trace"] = trace_state(topology, keys[0]["key"], keys[0]["dc"]) if keys else None
    return _embed(state)


def page_csp(page: str) -> str:
    """The page's Content-Security-Policy: only its own inline script runs (by hash), it fetches
    only from where it came from; anything injected into it could not run or send data out."""
    hashes = [base64.b64encode(hashlib.sha256(m.group(1).encode()).digest()).decode()
              for m in re.finditer(r"<script>(.*?)</script>", page, re.S)]
    scripts = " ".join(f"'sha256-{h}'" for h in hashes)
    return (f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def serve_dashboard(topology: Topology, host: str = "127.0.0.1", port: int = 0, *,
                    token: str | None = None) -> ServerHandle:
    """Serve the page on host:port (127.0.0.1 unless told otherwise; port 0 picks a free port).
    Any other host needs `token` (see xdc.observe.http: Bearer, or Basic with it as the password)."""
    text = _embed(None)
    page, headers = text.encode(), {"Content-Security-Policy": page_csp(text), "Referrer-Policy": "no-referrer"}

    def index() -> tuple[int, str, bytes, dict[str, str]]:
        return 200, "text/html; charset=utf-8", page, headers

    def api_state() -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(dashboard_state(topology), allow_nan=False).encode()

    def api_ready() -> tuple[int, str, bytes]:
        body = {"generated": time.time(), "datasets": ready_rows(topology)}
        return 200, "application/json", json.dumps(body, allow_nan=False).encode()

    def api_trace(query: dict[str, str]) -> tuple[int, str, bytes]:
        key = query.get("key", "")
        try:
            got = trace_state(topology, key, query.get("dc"))
        except XdcError as exc:
            return 400, "application/json", json.dumps({"error": str(exc)}).encode()
        if got is None:
            return 404, "application/json", json.dumps({"error": f"no trace kept for {key}"}).encode()
        return 200, "application/json", json.dumps(got, allow_nan=False, default=str).encode()

    return serve(host, port, extra_routes={"/": index, "/index.html": index, "/api/state": api_state,
                                           "/api/ready": api_ready},
                 query_routes={"/api/trace": api_trace}, token=token)
