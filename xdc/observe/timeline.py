"""One object's timeline across both datacenters, from the spans the built-in sink kept.

`timeline(topology, "bucket/key")` finds the object's names in every datacenter (the routes map
`idca-drive/camera/x` in A to `idcb-drive/camera/x` in B and back), the most recent trace with a
span naming one of them (from every datacenter's state), and keeps the spans on that object's
path: those naming it, their ancestors (where it came from, e.g. the raw frame a 720p frame was
made of) and their unnamed descendants (the steps inside them). Milestones: event time,
published, consumed, applied, warmed on each cache node, checked. The slowest step is the
largest of each step's own time (its duration minus its children's) and of the waits between
processes (published -> consumed, and so on).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from xdc import trace
from xdc.config import XdcConfig
from xdc.errors import ConfigError
from xdc.topology import Topology

# Human names of the steps (span names are the machine ones)
LABELS = {
    "ingest.object": "ingest", "scan.object": "scan (missed event)", "s3.put": "S3 put",
    "kafka.publish": "event published", "mirror.apply": "mirror: consumed -> applied",
    trace.COPY: "copy", trace.SOURCE_READ: "source read", trace.TRANSFER: "transfer",
    trace.TARGET_WRITE: "target write", "state.commit": "state commit", "applied.publish": "applied event published",
    "resize.frame": "resize worker", "s3.get": "S3 get", "resize": "resize", "resize.publish": "derivative published",
    "cache.warm_file": "warm on cache node", "cache.read_store": "read from the store",
    "cache.write_cache": "write to the cache", "cache.check_file": "checked",
}


@dataclass
class Step:
    name: str
    dc: str
    component: str
    key: str | None
    start: float
    end: float
    depth: int
    span_id: str
    parent_id: str | None
    status: str
    error: str
    attributes: dict[str, Any]
    links: list[str] = field(default_factory=list)  # "trace_id:span_id" of spans of other traces (a node job)
    self_s: float = 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def label(self) -> str:
        node = self.attributes.get("xdc.node")
        base = LABELS.get(self.name, self.name)
        return f"{base} {node}" if node and self.name == "cache.warm_file" else base

    def to_dict(self, t0: float) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "dc": self.dc, "component": self.component, "key": self.key,
                "start": self.start, "end": self.end, "offset_s": round(self.start - t0, 6),
                "duration_s": round(self.duration, 6), "self_s": round(self.self_s, 6), "depth": self.depth,
                "span_id": self.span_id, "parent_id": self.parent_id, "status": self.status, "error": self.error,
                "attributes": self.attributes, "links": self.links}


@dataclass
class Timeline:
    key: str
    names: list[tuple[str, str]]  # (datacenter, "bucket/key")
    trace_id: str
    steps: list[Step]
    milestones: dict[str, Any]
    start: float
    end: float
    slowest: dict[str, Any]
    other_traces: list[str] = field(default_factory=list)

    @property
    def e2e_s(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        t0 = self.start
        ms = {k: (round(v - t0, 6) if isinstance(v, float) else {n: round(t - t0, 6) for n, t in v.items()})
              for k, v in self.milestones.items()}
        return {"key": self.key, "names": [{"dc": d, "key": k} for d, k in self.names], "trace_id": self.trace_id,
                "other_traces": self.other_traces, "start": self.start, "end": self.end,
                "e2e_s": round(self.e2e_s, 6), "milestones": ms, "milestones_abs": self.milestones,
                "slowest": self.slowest, "steps": [s.to_dict(t0) for s in self.steps],
                "waits": [{**w, "offset_s": round(w["start"] - t0, 6)} for w in waits(self.steps)]}


# -- names ----------------------------------------------------------------------------------------
def _dcs_of_bucket(cfg: XdcConfig, bucket: str) -> list[str]:
    out = {n for n, d in cfg.datacenters.items() if bucket in d.buckets}
    for r in cfg.routes:
        if r.source.bucket == bucket:
            out.add(r.source.dc)
        if r.target.bucket == bucket:
            out.add(r.target.dc)
    return sorted(out)


def names_of(cfg: XdcConfig, key: str, dc: str | None = None) -> list[tuple[str, str]]:
    """Every (datacenter, "bucket/key") the object has: itself and where routes take it, both ways."""
    bucket, _, rest = key.partition("/")
    if not rest:
        raise ConfigError(f"not a bucket/key: {key!r}")
    homes = [dc] if dc else _dcs_of_bucket(cfg, bucket) or list(cfg.datacenters)
    seen: set[tuple[str, str]] = set()
    todo = deque((h, key) for h in homes)
    while todo:
        d, bk = todo.popleft()
        if (d, bk) in seen:
            continue
        seen.add((d, bk))
        b, _, k = bk.partition("/")
        for r in cfg.routes:
            if r.source.dc == d and r.source.covers(b, k):
                todo.append((r.target.dc, f"{r.target.bucket}/{r.target_key(k)}"))
            if r.target.dc == d and r.target.covers(b, k):
                todo.append((r.source.dc, f"{r.source.bucket}/{r.source.prefix}{k[len(r.target.prefix):]}"))
    return sorted(seen)


# -- the timeline ---------------------------------------------------------------------------------
def timeline(topology: Topology, key: str, *, dc: str | None = None, trace_id: str | None = None) -> Timeline | None:
    """The object's most recent traced journey (or trace `trace_id`); None if none was kept."""
    names = names_of(topology.config, key, dc)
    keys = sorted({k for _, k in names})
    traces: dict[str, int] = {}
    for site in topology.sites:
        for i, t in enumerate(site.state.traces.trace_ids(keys)):
            traces[t] = min(traces.get(t, i), i)
    if trace_id is None:
        if not traces:
            return None
        ordered = sorted(traces, key=lambda t: traces[t])
        trace_id, others = ordered[0], ordered[1:]
    else:
        others = [t for t in traces if t != trace_id]
    spans: dict[str, dict[str, Any]] = {}
    for site in topology.sites:
        for s in site.state.traces.spans([trace_id]):
            spans.setdefault(s["span_id"], s)
    if not spans:
        return None
    steps = _path(list(spans.values()), set(keys))
    if not steps:
        return None
    _self_times(steps)
    milestones = _milestones(steps, set(keys))
    start = min([s.start for s in steps] + ([milestones["event_time"]] if "event_time" in milestones else []))
    end = max(s.end for s in steps)
    return Timeline(key, names, trace_id, steps, milestones, start, end, _slowest(steps), others)


def _path(spans: list[dict[str, Any]], keys: set[str]) -> list[Step]:
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str, list[str]] = {}
    for s in spans:
        if s["parent_id"]:
            children.setdefault(s["parent_id"], []).append(s["span_id"])
    named = {sid for sid, s in by_id.items() if s["key"] in keys}
    keep = set(named)
    for sid in named:  # where it came from
        p = by_id[sid]["parent_id"]
        while p and p in by_id and p not in keep:
            keep.add(p)
            p = by_id[p]["parent_id"]
    # the steps inside (not another object's): of the named spans, and the unnamed ones of their ancestors
    todo = deque(named | {sid for sid in keep if sid not in named})
    while todo:
        for c in children.get(todo.popleft(), ()):
            if c not in keep and by_id[c]["key"] in (None, "", *keys):
                keep.add(c)
                todo.append(c)
    depth: dict[str, int] = {}

    def depth_of(sid: str) -> int:
        if sid not in depth:
            p = by_id[sid]["parent_id"]
            depth[sid] = depth_of(p) + 1 if p in keep else 0
        return depth[sid]

    out = [Step(s["name"], s["dc"], s["component"], s["key"], float(s["start_time"]), float(s["end_time"]),
                depth_of(sid), sid, s["parent_id"], s["status"], s.get("error") or "", s["attributes"], s["links"])
           for sid, s in by_id.items() if sid in keep]
    return sorted(out, key=lambda x: (x.start, x.depth))


def _self_times(steps: list[Step]) -> None:
    kids: dict[str, list[Step]] = {}
    for s in steps:
        if s.parent_id:
            kids.setdefault(s.parent_id, []).append(s)
    for s in steps:
        covered, at = 0.0, s.start
        for c in sorted(kids.get(s.span_id, []), key=lambda c: c.start):
            lo, hi = max(c.start, at), min(c.end, s.end)
            if hi > lo:
                covered += hi - lo
                at = hi
        s.self_s = max(0.0, s.duration - covered)


def _first(steps: list[Step], name: str) -> Step | None:
    return next((s for s in steps if s.name == name), None)


def _milestones(steps: list[Step], keys: set[str]) -> dict[str, Any]:
    m: dict[str, Any] = {}
    # the object's own event (a 720p frame's, not the raw frame's it was made of)
    own = [s.attributes.get("xdc.event_time") for s in steps if s.key in keys]
    times = [float(t) for t in own if isinstance(t, (int, float))]
    if times:
        m["event_time"] = min(times)
    apply_ = _first(steps, "mirror.apply")
    if apply_ is not None:
        by_id = {s.span_id: s for s in steps}
        pub = by_id.get(apply_.parent_id or "")
        if pub is not None and pub.name == "kafka.publish":
            m["published"] = pub.end
        m["consumed"] = apply_.start
        commit = next((s for s in steps if s.name == "state.commit" and s.parent_id == apply_.span_id), None)
        if commit is not None:
            m["applied"] = commit.end
    warmed = {f"{s.dc}:{s.attributes.get('xdc.node', '?')}": s.end for s in steps if s.name == "cache.warm_file"}
    if warmed:
        m["warmed"] = warmed
    checked = {s.dc: s.end for s in steps if s.name == "cache.check_file"}
    if checked:
        m["checked"] = checked
    return m


def waits(steps: list[Step]) -> list[dict[str, Any]]:
    """Time between processes: a message in Kafka (published -> consumed), and an object applied
    until its prewarm began."""
    out = []
    by_id = {s.span_id: s for s in steps}
    for s in steps:
        p = by_id.get(s.parent_id or "")
        if p is not None and p.name == "kafka.publish" and s.start > p.end:
            out.append({"kind": "wait", "name": f"{p.name} -> {s.name}", "label": f"in Kafka: before {s.label}",
                        "dc": s.dc, "start": p.end, "seconds": round(s.start - p.end, 6)})
    for anchor in (s for s in steps if s.name in ("mirror.apply", "ingest.object", "resize.publish")):
        warm = min((s for s in steps if s.parent_id == anchor.span_id and s.name == "cache.warm_file"),
                   key=lambda s: s.start, default=None)
        if warm is not None and warm.start > anchor.end:
            out.append({"kind": "wait", "name": f"{anchor.name} -> cache.warm_file",
                        "label": "until the prewarm began", "dc": warm.dc, "start": anchor.end,
                        "seconds": round(warm.start - anchor.end, 6)})
    return out


def _slowest(steps: list[Step]) -> dict[str, Any]:
    """The step (own time) or the wait between two processes that took longest."""
    best: dict[str, Any] = {"kind": "step", "name": "", "label": "", "dc": "", "seconds": -1.0}
    for s in steps:
        if s.self_s > best["seconds"]:
            best = {"kind": "step", "name": s.name, "label": s.label, "dc": s.dc, "seconds": round(s.self_s, 6)}
    for w in waits(steps):
        if w["seconds"] > best["seconds"]:
            best = {k: v for k, v in w.items() if k != "start"}
    return best


def render(tl: Timeline) -> str:
    """The timeline as text for a terminal."""
    def clock(t: float) -> str:
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"

    def dur(s: float) -> str:
        return f"{s * 1000:8.1f} ms" if s < 1 else f"{s:8.3f} s "

    lines = [f"trace of {tl.key}   (trace {tl.trace_id})",
             "  names: " + ", ".join(f"{d} {k}" for d, k in tl.names)]
    if tl.other_traces:
        lines.append(f"  {len(tl.other_traces)} older trace(s) of this object: {', '.join(tl.other_traces[:5])}")
    ev = tl.milestones.get("event_time")
    lines.append(f"  event time {clock(ev) if ev else '(unknown)'};  end to end {tl.e2e_s:.3f} s")
    lines.append(f"  {'offset':>10}  {'duration':>11}  dc  step")
    for s in tl.steps:
        err = f"   ERROR {s.error}" if s.status == "error" else ""
        where = f"  [{s.key}]" if s.key and s.depth == 0 else ""
        lines.append(f"  {s.start - tl.start:+9.3f}s  {dur(s.duration)}  {s.dc or '-':2}  "
                     f"{'  ' * s.depth}{s.label}{where}{err}")
    parts = []
    for k in ("published", "consumed", "applied"):
        if k in tl.milestones:
            parts.append(f"{k} +{tl.milestones[k] - tl.start:.3f}s")
    for k in ("warmed", "checked"):
        for n, t in sorted(tl.milestones.get(k, {}).items()):
            parts.append(f"{k} {n} +{t - tl.start:.3f}s")
    if parts:
        lines.append("  milestones: " + ", ".join(parts))
    sl = tl.slowest
    lines.append(f"  slowest step: {sl['label']} ({sl['dc']}) {sl['seconds']:.3f} s")
    return "\n".join(lines)
