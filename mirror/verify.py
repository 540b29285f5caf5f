"""Do both datacenters really agree? `verify` marches a route's source listing against its target
listing (rclone check) and counts what is missing, extra, different and matching.

    source list ──┐                                       missing  (source only)
                  ├─> march (mirror.march) ─> compare ──> extra    (target only)
    target list ──┘   by key under the prefixes           differ   (size, or ETag: multipart-aware)
                                                          match

Both listings are streamed page by page (S3 lists in key order), so a route of millions of
objects is never held in memory: only the counts and the first `max_sample` differences are
kept. A data route's target is its bucket (not the catalog: an object deleted or overwritten out
of band in the target is seen); a metadata route has no target objects, so its target is what
the target's state records.

ETags: single-part ETags are MD5s and compare directly; a multipart ETag ("...-N") depends on the
part sizes, so when one side is multipart the target's `xdc-source-etag` (what the copy saw at the
source) is compared with the source's ETag instead (one HEAD per such object).

`repair`: each difference becomes a reconciliation on the source datacenter's events topic, so
the mirror fixes it through the normal path (it reads the source and makes the target match). A
run is recorded in the target datacenter's state (the dashboard's "last verify") and exported as
the drift gauge.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from mirror.march import march
from xdc.config import Route
from xdc.errors import ConfigError, ObjectNotFound, StoreError
from xdc.events import encode_notification, message_key, reconcile_record
from xdc.io.kafka import kafka_errors
from xdc.io.store import META_SOURCE_ETAG, ObjectInfo, plain_md5_etag
from xdc.metrics import METRICS, Metrics
from xdc.topology import Topology

log = logging.getLogger(__name__)

Kind = Literal["missing", "extra", "differ"]


@dataclass
class VerifyReport:
    route: str
    trigger: str = "manual"
    started: float = 0.0
    finished: float = 0.0
    source_listed: int = 0
    target_listed: int = 0
    missing: int = 0
    extra: int = 0
    differ: int = 0
    matched: int = 0
    errors: int = 0
    repaired: int = 0  # reconciliations published
    sample: list[dict[str, Any]] = field(default_factory=list)

    @property
    def drift(self) -> int:
        return self.missing + self.extra + self.differ

    @property
    def compared_per_s(self) -> float:
        return max(self.source_listed, self.target_listed) / max(1e-9, self.finished - self.started)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["drift"] = self.drift
        d["seconds"] = round(self.finished - self.started, 3)
        return d

    def summary(self) -> str:
        """In the words of `rclone check`."""
        what = "differences found" if self.drift else "differences found (in sync)"
        return (f"route {self.route}: {self.drift} {what}; {self.missing} missing in the target, "
                f"{self.extra} extra in the target, {self.differ} differ, {self.matched} matching, "
                f"{self.errors} errors; listed {self.source_listed} source / {self.target_listed} target objects"
                f" in {self.finished - self.started:.1f}s" + (f"; {self.repaired} repairs published" if self.repaired else ""))


@dataclass(frozen=True)
class _Obj:
    rel: str  # key under the route's prefix
    size: int
    etag: str
    info: ObjectInfo | None = None  # a target object (for a HEAD when ETags need a second look)
    source_etag: str | None = None  # a catalog row's source ETag (metadata routes)


def find_route(topology: Topology, name: str) -> Route:
    for r in topology.config.routes:
        if r.name == name:
            return r
    raise ConfigError(f"no route {name!r} (routes: {', '.join(r.name for r in topology.config.routes)})")


def verify_route(topology: Topology, route: str | Route, *, repair: bool = False, trigger: str = "manual",
                 max_sample: int = 20, metrics: Metrics | None = None, record: bool = True) -> VerifyReport:
    """Compare a route's source and target, publish repairs if asked, record and export the result."""
    r = find_route(topology, route) if isinstance(route, str) else route
    src_site, dst_site = topology.site(r.source.dc), topology.site(r.target.dc)
    rep = VerifyReport(r.name, trigger, started=time.time())
    source = (_Obj(o.key[len(r.source.prefix):], o.size, o.etag) for o in src_site.store.list(r.source.bucket, r.source.prefix))
    target: Iterator[_Obj]
    if r.mode == "data":
        target = (_Obj(o.key[len(r.target.prefix):], o.size, o.etag, info=o)
                  for o in dst_site.store.list(r.target.bucket, r.target.prefix))
    else:  # nothing is written to a metadata route's target: what it holds is what its state records
        target = (_Obj(e.source_key[len(r.source.prefix):], e.size, e.etag, source_etag=e.source_etag)
                  for e in dst_site.state.catalog.iter_route(r.name, r.source.prefix))
    publish = _publisher(topology, r) if repair else None

    def head(o: _Obj) -> ObjectInfo:
        assert o.info is not None
        return dst_site.store.head(o.info.bucket, o.info.key)

    for s, t in march(source, target, lambda o: o.rel, lambda o: o.rel):
        if s is not None:
            rep.source_listed += 1
        if t is not None:
            rep.target_listed += 1
        try:
            kind: Kind | None = "missing" if t is None else "extra" if s is None else (
                None if _same(s, t, head) else "differ")
        except StoreError as exc:  # a HEAD that failed: counted, the march goes on
            rep.errors += 1
            log.warning("verify %s: %s: %s", r.name, (s or t).rel, exc)  # type: ignore[union-attr]
            continue
        if kind is None:
            rep.matched += 1
            continue
        setattr(rep, kind, getattr(rep, kind) + 1)
        rel = (s or t).rel  # type: ignore[union-attr]
        if len(rep.sample) < max_sample:
            rep.sample.append({"kind": kind, "key": r.source.prefix + rel,
                               "source": {"size": s.size, "etag": s.etag} if s else None,
                               "target": {"size": t.size, "etag": t.etag} if t else None})
        if publish is not None:
            publish(kind, r.source.prefix + rel, s)
            rep.repaired += 1
    if publish is not None:
        with kafka_errors("flush verify repairs"):
            src_site.producer.flush(timeout=60)
    rep.finished = time.time()
    log.info("%s", rep.summary())
    m = metrics or METRICS
    m.verify_drift_objects.labels(r.name).set(rep.drift)
    m.verify_last_run_timestamp_seconds.labels(r.name).set(rep.finished)
    if record:
        dst_site.state.verify.record(rep.to_dict())
    return rep


def _same(s: _Obj, t: _Obj, head: Callable[[_Obj], ObjectInfo]) -> bool:
    if s.size != t.size:
        return False
    if t.source_etag is not None:  # a catalog row: it recorded the source's ETag
        return t.source_etag == s.etag
    if s.etag == t.etag:
        return True
    if plain_md5_etag(s.etag) and plain_md5_etag(t.etag):
        return False  # two MD5s: different bytes
    try:  # a multipart ETag on one side: compare what the copy recorded of the source
        return head(t).metadata.get(META_SOURCE_ETAG) == s.etag
    except ObjectNotFound:
        return False


def _publisher(topology: Topology, r: Route) -> Callable[[Kind, str, _Obj | None], None]:
    """Repairs go through the normal path: reconciliations on the source datacenter's events topic."""
    site = topology.site(r.source.dc)
    region = site.config.s3.region

    def publish(kind: Kind, source_key: str, s: _Obj | None) -> None:
        rec = (reconcile_record("delete", r.source.bucket, source_key, region=region) if kind == "extra" else
               reconcile_record("put", r.source.bucket, source_key, size=s.size if s else 0,
                                etag=s.etag if s else "", region=region))
        with kafka_errors("publish verify repair"):
            site.producer.send(site.topics.events, key=message_key(r.source.bucket, source_key),
                               value=encode_notification([rec]))

    return publish
