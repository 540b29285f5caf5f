"""What a proposed config would change, before it is applied (`xdc config impact NEW.yaml`).

Compared with the live config and the live state of every datacenter:

- routes: for each route added, removed or changed, the catalogued objects it re-routes (another
  route now handles their events), orphans (no route maintains them in that datacenter any more)
  or must copy (a new target, metadata -> data, or objects newly covered, found by listing the
  source bucket), with their bytes. Each catalogued object is classified by the route the
  mirror would pick for it under the new config (the first route into its datacenter that covers
  its source key, as `xdc.routing.route_event` does);
- cache: per datacenter whose cache nodes or placement change, per active dataset, the files and
  bytes that move to a node that must warm them (`shard`: the balanced placement by bytes over the
  dataset's files, as the warm computes it; `replicate`: every file for a new node);
- readiness: the active datasets that would lose readiness, where, and why;
- bucket collisions and internal/external endpoint mistakes the new config introduces.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cache_client.placement import place
from xdc.config import CacheConfig, Route, XdcConfig, bucket_collisions
from xdc.errors import XdcError
from xdc.io.state import CatalogEntry
from xdc.observe.configs import config_hash, short
from xdc.observe.http import is_loopback
from xdc.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class Tally:
    objects: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.objects += 1
        self.bytes += max(0, size)

    def to_dict(self) -> dict[str, int]:
        return {"objects": self.objects, "bytes": self.bytes}


@dataclass
class RouteChange:
    route: str
    change: str  # added | removed | changed
    fields: list[str] = field(default_factory=list)
    reroutes: Tally = field(default_factory=Tally)
    orphans: Tally = field(default_factory=Tally)
    must_copy: Tally = field(default_factory=Tally)
    newly_covered: Tally | None = None  # source objects not catalogued that it now covers (listing)
    listing_error: str | None = None
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, key: str) -> None:
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 5:
            ex.append(key)

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, "change": self.change, "fields": self.fields,
                "reroutes": self.reroutes.to_dict(), "orphans": self.orphans.to_dict(),
                "must_copy": self.must_copy.to_dict(),
                "newly_covered": self.newly_covered.to_dict() if self.newly_covered else None,
                "listing_error": self.listing_error, "examples": self.examples}


@dataclass
class ImpactReport:
    live_hash: str
    new_hash: str
    changed_fields: list[str]
    routes: list[RouteChange]
    cache: list[dict[str, Any]]
    readiness: list[dict[str, Any]]
    collisions: list[str]
    endpoints: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"live": short(self.live_hash), "new": short(self.new_hash), "changed_fields": self.changed_fields,
                "routes": [r.to_dict() for r in self.routes], "cache": self.cache, "readiness": self.readiness,
                "collisions": self.collisions, "endpoints": self.endpoints}

    def summary(self) -> str:
        lines = [f"config impact: live {short(self.live_hash)} -> new {short(self.new_hash)}"
                 f" ({len(self.changed_fields)} fields differ)"]
        for r in self.routes:
            lines.append(f"  route {r.route} {r.change}{' (' + ', '.join(r.fields) + ')' if r.fields else ''}: "
                         f"re-routes {r.reroutes.objects} objects ({_b(r.reroutes.bytes)}), "
                         f"orphans {r.orphans.objects} ({_b(r.orphans.bytes)}), "
                         f"must copy {r.must_copy.objects} ({_b(r.must_copy.bytes)})"
                         + (f", newly covers {r.newly_covered.objects} uncatalogued objects ({_b(r.newly_covered.bytes)})"
                            if r.newly_covered else "")
                         + (f" [source not listed: {r.listing_error}]" if r.listing_error else ""))
        for c in self.cache:
            lines.append(f"  cache {c['dc']}: {'; '.join(c['changes'])}")
            for d in c["datasets"]:
                lines.append(f"    {d['dataset']}@{d['version']}: {d['moved_files']} of {d['files']} files "
                             f"({_b(d['moved_bytes'])}) move; to warm per node: "
                             + (", ".join(f"{n} {v['files']} files" for n, v in d["to_warm"].items()) or "none"))
        for r in self.readiness:
            lines.append(f"  dataset {r['dataset']}@{r['version']} loses readiness in {r['dc']}: {'; '.join(r['reasons'])}")
        for c in self.collisions:
            lines.append(f"  BUCKET COLLISION: {c}")
        for e in self.endpoints:
            lines.append(f"  ENDPOINT: {e}")
        if len(lines) == 1:
            lines.append("  no route, cache or endpoint change")
        return "\n".join(lines)


def _b(n: int) -> str:
    v, u = float(n), ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while v >= 1024 and i < len(u) - 1:
        v /= 1024
        i += 1
    return f"{v:.0f} {u[i]}" if i == 0 else f"{v:.1f} {u[i]}"


# -- the report -----------------------------------------------------------------------------------
def impact(live: Topology, new: XdcConfig, *, list_sources: bool = True) -> ImpactReport:
    """Compare `new` with the live config (`live.config`) and the live state."""
    old = live.config
    routes, unmaintained = _routes(live, new, list_sources=list_sources)
    cache = _cache(live, new)
    return ImpactReport(
        config_hash(old), config_hash(new), _changed_fields(_plain(old), _plain(new)),
        routes, cache, _readiness(live, new, cache, unmaintained),
        [c for c in bucket_collisions(new) if c not in bucket_collisions(old)],
        [e for e in endpoint_mistakes(new) if e not in endpoint_mistakes(old)])


def _plain(cfg: XdcConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude={"base_dir", "local_dc", "run_dir"})


def _changed_fields(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths that differ; list items by their name when they have one (routes, nodes)."""
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) and "name" in x for x in a + b):
        a, b = {x["name"]: x for x in a}, {x["name"]: x for x in b}
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _changed_fields(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path]


# -- routes ---------------------------------------------------------------------------------------
def _route_fields(a: Route, b: Route) -> list[str]:
    out = []
    for part in ("source", "target"):
        for f in ("dc", "bucket", "prefix"):
            if getattr(getattr(a, part), f) != getattr(getattr(b, part), f):
                out.append(f"{part}.{f}")
    if a.mode != b.mode:
        out.append(f"mode {a.mode} -> {b.mode}")
    return out


def route_for(routes: Iterable[Route], target_dc: str, source_dc: str, bucket: str, key: str) -> Route | None:
    """The route the mirror into target_dc picks for a source object (the first that covers it)."""
    for r in routes:
        if r.target.dc == target_dc and r.source.dc == source_dc and r.source.covers(bucket, key):
            return r
    return None


def _routes(live: Topology, new: XdcConfig, *, list_sources: bool) -> tuple[list[RouteChange], set[tuple[str, str]]]:
    """Route changes with their tallies, and the (dc, "bucket/key") no route will maintain."""
    old_by = {r.name: r for r in live.config.routes}
    new_by = {r.name: r for r in new.routes}
    changes: dict[str, RouteChange] = {}
    for name in sorted(set(old_by) | set(new_by)):
        a, b = old_by.get(name), new_by.get(name)
        if a is None:
            changes[name] = RouteChange(name, "added")
        elif b is None:
            changes[name] = RouteChange(name, "removed")
        elif a != b:
            changes[name] = RouteChange(name, "changed", _route_fields(a, b))
    unmaintained: set[tuple[str, str]] = set()
    if not changes:
        return [], unmaintained
    order = list(new.routes)
    catalogued: dict[str, set[tuple[str, str, str]]] = {}  # target dc -> (source dc, bucket, key)
    for dc in sorted({r.target.dc for r in live.config.routes} & set(live.config.datacenters)):
        seen = catalogued.setdefault(dc, set())
        for e in _catalogued(live, dc):
            seen.add((e.source_dc, e.source_bucket, e.source_key))
            nr = route_for(order, dc, e.source_dc, e.source_bucket, e.source_key) if dc in new.datacenters else None
            here = f"{e.bucket}/{e.key}"
            # effects are counted under the route that causes them: an orphan under the route that
            # let it go, a re-route and a copy under the route that takes the object over
            if nr is None:
                _tally(changes, new_by, e.route, "orphans", e, here)
                unmaintained.add((dc, here))
                continue
            if nr.name != e.route:
                _tally(changes, new_by, nr.name, "reroutes", e, here)
            if (nr.target.bucket, nr.target_key(e.source_key)) != (e.bucket, e.key):
                _tally(changes, new_by, nr.name, "must_copy", e, here)
                _tally(changes, new_by, e.route, "orphans", e, here)  # the copy it leaves behind
                unmaintained.add((dc, here))
            elif nr.mode == "data" and e.mode == "metadata":
                _tally(changes, new_by, nr.name, "must_copy", e, here)
    if list_sources:
        for name, ch in changes.items():
            b = new_by.get(name)
            a = old_by.get(name)
            if b is None or (a is not None and a.source == b.source and a.target.dc == b.target.dc):
                continue
            ch.newly_covered = Tally()
            try:
                for o in live.site(b.source.dc).store.list(b.source.bucket, b.source.prefix):
                    if (b.source.dc, o.bucket, o.key) in catalogued.get(b.target.dc, set()):
                        continue
                    if route_for(order, b.target.dc, b.source.dc, o.bucket, o.key) is not b:
                        continue  # an earlier route takes it
                    ch.newly_covered.add(o.size)
                    if b.mode == "data":
                        ch.must_copy.add(o.size)
                    ch.note("newly_covered", f"{o.bucket}/{o.key}")
            except XdcError as exc:  # an endpoint away: say so, report the rest
                ch.listing_error = str(exc)[:300]
    return list(changes.values()), unmaintained


def _catalogued(live: Topology, dc: str) -> Iterable[CatalogEntry]:
    cat = live.site(dc).state.catalog
    for route in sorted(cat.route_totals()):
        yield from cat.iter_route(route)


def _tally(changes: dict[str, RouteChange], new_by: dict[str, Route], route: str, kind: str, e: CatalogEntry,
           key: str) -> None:
    ch = changes.get(route)
    if ch is None:  # an unchanged route that takes objects over, or one gone from both configs
        ch = changes.setdefault(route, RouteChange(route, "takes over" if route in new_by else "removed"))
    getattr(ch, kind).add(e.size)
    ch.note(kind, key)


# -- cache ----------------------------------------------------------------------------------------
def _owners(keys: list[str], cache: CacheConfig, sizes: dict[str, int | None]) -> dict[str, set[str]]:
    """bucket_key -> the nodes that should hold it (the warm's own placement code, by bytes)."""
    out: dict[str, set[str]] = {k: set() for k in keys}
    nodes = [n.name for n in cache.nodes]
    for node, ks in place(keys, nodes, cache.placement, cache.virtual_nodes, [sizes.get(k) for k in keys]).items():
        for k in ks:
            out[k].add(node)
    return out


def _cache_changes(a: CacheConfig | None, b: CacheConfig | None) -> list[str]:
    if a is None and b is None:
        return []
    if a is None:
        return ["cache cluster added"]
    if b is None:
        return ["cache cluster removed"]
    out = []
    an, bn = [n.name for n in a.nodes], [n.name for n in b.nodes]
    if added := [n for n in bn if n not in an]:
        out.append("nodes added: " + ", ".join(added))
    if removed := [n for n in an if n not in bn]:
        out.append("nodes removed: " + ", ".join(removed))
    for f in ("placement", "virtual_nodes", "bucket_root", "meta_url"):
        if getattr(a, f) != getattr(b, f):
            out.append(f"{f} {getattr(a, f)} -> {getattr(b, f)}")
    return out


def _cache(live: Topology, new: XdcConfig) -> list[dict[str, Any]]:
    out = []
    for dc in sorted(set(live.config.datacenters) | set(new.datacenters)):
        a = live.config.datacenters[dc].cache if dc in live.config.datacenters else None
        b = new.datacenters[dc].cache if dc in new.datacenters else None
        changes = _cache_changes(a, b)
        if not changes:
            continue
        row: dict[str, Any] = {"dc": dc, "changes": changes, "datasets": []}
        if dc in live.config.datacenters and a is not None:
            site = live.site(dc)
            for reg in site.state.prewarm.registrations():
                if reg.state != "active":
                    continue
                got = site.state.prewarm.staged(reg.dataset, reg.version)
                keys = got[0] if got else []
                row["datasets"].append({"dataset": reg.dataset, "version": reg.version,
                                        **_moves(site, keys, a, b)})
        out.append(row)
    return out


def _moves(site: Any, keys: list[str], a: CacheConfig, b: CacheConfig | None) -> dict[str, Any]:
    sizes = _sizes(site, keys)
    if b is None:
        return {"files": len(keys), "moved_files": 0, "moved_bytes": 0, "to_warm": {}, "unknown_sizes": 0}
    whole = a.bucket_root != b.bucket_root or a.meta_url != b.meta_url  # every path is new
    old, now = _owners(keys, a, sizes), _owners(keys, b, sizes)
    to_warm: dict[str, dict[str, Any]] = {}
    moved_files = moved_bytes = 0
    for k in keys:
        fresh = now[k] if whole else now[k] - old[k]
        if not fresh:
            continue
        moved_files += 1
        moved_bytes += sizes.get(k) or 0
        for n in sorted(fresh):
            t = to_warm.setdefault(n, {"files": 0, "bytes": 0, "keys": []})
            t["files"] += 1
            t["bytes"] += sizes.get(k) or 0
            t["keys"].append(k)
    return {"files": len(keys), "moved_files": moved_files, "moved_bytes": moved_bytes,
            "to_warm": dict(sorted(to_warm.items())), "unknown_sizes": sum(1 for k in keys if sizes.get(k) is None)}


def _sizes(site: Any, keys: list[str]) -> dict[str, int | None]:
    """Sizes from the datacenter's catalog (objects mirrored into it)."""
    pairs = [tuple(k.split("/", 1)) for k in keys]
    got = site.state.catalog.get_many(pairs)
    return {f"{b}/{k}": (got[(b, k)].size if (b, k) in got and not got[(b, k)].deleted else None) for b, k in pairs}


# -- readiness ------------------------------------------------------------------------------------
def _readiness(live: Topology, new: XdcConfig, cache: list[dict[str, Any]],
               unmaintained: set[tuple[str, str]]) -> list[dict[str, Any]]:
    moved = {(c["dc"], d["dataset"], d["version"]): d for c in cache for d in c["datasets"]}
    changes = {c["dc"]: c["changes"] for c in cache}
    new_pw = set(new.prewarm.datacenters) or {n for n, d in new.datacenters.items() if d.cache}
    out = []
    for site in live.sites:
        dc = site.name
        for reg in site.state.prewarm.registrations():
            if reg.state != "active":
                continue
            reasons = []
            got = site.state.prewarm.staged(reg.dataset, reg.version)
            keys = got[0] if got else []
            if dc not in new.datacenters:
                reasons.append("the datacenter is gone from the config")
            elif new.datacenters[dc].cache is None:
                reasons.append("its cache cluster is removed")
            else:
                if dc not in new_pw:
                    reasons.append("no longer a prewarm datacenter (prewarm.datacenters)")
                d = moved.get((dc, reg.dataset, reg.version))
                if d and d["moved_files"]:
                    reasons.append(f"{d['moved_files']} files must be warmed on "
                                   f"{', '.join(d['to_warm'])} ({'; '.join(changes.get(dc, []))})")
            gone = [k for k in keys if (dc, k) in unmaintained]
            if gone:
                reasons.append(f"{len(gone)} files no longer mirrored into {dc} (e.g. {gone[0]})")
            if reasons:
                out.append({"dc": dc, "dataset": reg.dataset, "version": reg.version, "reasons": reasons})
    return out


# -- endpoints ------------------------------------------------------------------------------------
def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def endpoint_mistakes(cfg: XdcConfig) -> list[str]:
    """Internal/external endpoints that point at the wrong place (the config loads fine with them)."""
    out = []
    dcs = cfg.datacenters
    for name, d in dcs.items():
        ep = d.s3
        if is_loopback(_host(ep.external_url)) and not is_loopback(_host(ep.internal_url)):
            out.append(f"{name}: s3.external_url {ep.external_url} is a loopback address: the other datacenter "
                       "cannot reach it")
        for other, o in dcs.items():
            if other == name:
                continue
            if ep.external_url == o.s3.internal_url or ep.internal_url == o.s3.internal_url:
                which = "external_url" if ep.external_url == o.s3.internal_url else "internal_url"
                out.append(f"{name}: s3.{which} {getattr(ep, which)} is datacenter {other}'s internal endpoint")
            if other > name and ep.external_url == o.s3.external_url:
                out.append(f"{name} and {other} share s3.external_url {ep.external_url}")
        k = d.kafka
        for other, o in dcs.items():
            if other == name:
                continue
            ext = set(k.external_bootstrap_servers or [])
            if ext & set(o.kafka.bootstrap_servers):
                out.append(f"{name}: kafka.external_bootstrap_servers {sorted(ext & set(o.kafka.bootstrap_servers))} "
                           f"are datacenter {other}'s internal brokers")
            if other > name and set(k.bootstrap_servers) & set(o.kafka.bootstrap_servers):
                out.append(f"{name} and {other} share Kafka brokers "
                           f"{sorted(set(k.bootstrap_servers) & set(o.kafka.bootstrap_servers))}")
    return out
