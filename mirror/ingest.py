"""Sources of events the project makes itself: `ingest` uploads files (and announces them when the
store does not); `scan` diffs a bucket against the catalog and publishes events for changes that
were missed.

What they publish are reconciliations, not S3 events: no sequencer of ours competes with the
store's; the mirror reads the source's current state of each key and makes the target match it.
A store with notifications (`s3.notifications: true`) announces its writes itself, so ingest then
publishes nothing (otherwise every object would be announced twice).

An object's trace starts here (sampled, `xdc.trace.root`): `ingest.object` with its `s3.put` and
the `kafka.publish` of its event, whose traceparent the event carries to the mirror and resize.
(A store's own notification carries none: the mirror and resize then start the object's trace.)
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.march import march
from xdc import trace
from xdc.errors import ConfigError
from xdc.events import encode_notification, message_key, reconcile_record, validate_key
from xdc.io.kafka import kafka_errors, send_step
from xdc.io.state import CatalogEntry
from xdc.io.store import ObjectInfo
from xdc.topology import Site

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    files: int = 0
    bytes: int = 0
    events: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "events": self.events, "seconds": round(self.seconds, 3)}


def _files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p


def ingest(site: Site, src_dir: str | Path, bucket: str, prefix: str = "", *,
           concurrency: int = 8, progress: Callable[[int, int], None] | None = None,
           announce: bool | None = None) -> IngestReport:
    """Upload every file under src_dir to the site's bucket/prefix. `announce` (default: when the
    store has no notifications): publish one event per object on the site's events topic (keyed by
    bucket/key, so one object's events stay in order)."""
    root = Path(src_dir)
    if not root.is_dir():
        raise ConfigError(f"ingest: not a directory: {root}")
    store = site.store
    store.ensure_bucket(bucket)
    announce = not site.config.s3.notifications if announce is None else announce
    producer = site.producer if announce else None
    region = site.config.s3.region
    rep = IngestReport()
    t0 = time.monotonic()
    paths = list(_files(root))

    def upload(p: Path) -> tuple[ObjectInfo, Any]:
        key = validate_key(prefix + p.relative_to(root).as_posix())
        span = trace.root("ingest.object", attributes=trace.attrs(dc=site.name, key=f"{bucket}/{key}", op="put"))
        with trace.use(span), trace.step("s3.put", dc=site.name):
            info = store.put(bucket, key, p.read_bytes())
        return info, span

    with ThreadPoolExecutor(concurrency) as pool:
        for info, span in pool.map(upload, paths):
            t_event = time.time()
            if producer is not None:
                rec = reconcile_record("put", bucket, info.key, size=info.size, etag=info.etag, region=region,
                                       event_time=t_event)
                with kafka_errors("publish event"):
                    send_step(producer, site.topics.events, key=message_key(bucket, info.key),
                              value=encode_notification([rec]), parent=span, starts_object=True,
                              attributes=trace.attrs(dc=site.name, key=f"{bucket}/{info.key}"))
                rep.events += 1
            trace.end(span, attributes={"xdc.event_time": t_event, "xdc.bytes": info.size})
            rep.files += 1
            rep.bytes += info.size
            if progress:
                progress(rep.files, len(paths))
    if producer is not None:
        with kafka_errors("flush events"):
            producer.flush(timeout=60)
    rep.seconds = time.monotonic() - t0
    return rep


def publish_delete(site: Site, bucket: str, key: str, *, delete_object: bool = True) -> None:
    """Delete an object in the site; announce it (a reconciliation: the mirror looks at the source)
    unless the store announces its deletes itself."""
    span = trace.root("ingest.object", attributes=trace.attrs(dc=site.name, key=f"{bucket}/{key}", op="delete"))
    if delete_object:
        with trace.use(span), trace.step("s3.delete", dc=site.name):
            site.store.delete(bucket, key)
    t_event = time.time()
    if delete_object and site.config.s3.notifications:
        trace.end(span, attributes={"xdc.event_time": t_event})
        return
    with kafka_errors("publish delete"):
        rec = reconcile_record("delete", bucket, key, region=site.config.s3.region, event_time=t_event)
        send_step(site.producer, site.topics.events, key=message_key(bucket, key),
                  value=encode_notification([rec]), parent=span,
                  starts_object=True, attributes=trace.attrs(dc=site.name, key=f"{bucket}/{key}"))
        trace.end(span, attributes={"xdc.event_time": t_event})
        site.producer.flush(timeout=30)


@dataclass
class ScanReport:
    listed: int = 0
    missing: int = 0  # in the source, not (or not this version) in the target catalog
    differ: int = 0
    extra: int = 0  # live in the catalog, gone from the source
    events: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def scan(site: Site, bucket: str, prefix: str = "", *, dry_run: bool = False) -> ScanReport:
    """For each route out of the site covering bucket/prefix: list the source, march it against the
    target's catalog, and publish put events for missing or changed objects and delete events
    for objects the catalog holds that the source no longer has."""
    routes = [r for r in site.routes_out if r.source.bucket == bucket
              and (r.source.prefix.startswith(prefix) or prefix.startswith(r.source.prefix))]
    if not routes:
        raise ConfigError(f"scan: no route from {site.name}:{bucket}/{prefix}")
    rep = ScanReport()
    region = site.config.s3.region
    for r in routes:
        pfx = max(prefix, r.source.prefix, key=len)
        catalog = site.topology.site(r.target.dc).state.catalog
        src = site.store.list(bucket, pfx)
        dst = catalog.iter_route(r.name, pfx)
        for s_obj, c_obj in march(src, dst, lambda o: o.key, lambda e: e.source_key):
            if s_obj is not None:
                rep.listed += 1
            rec = _scan_record(s_obj, c_obj, rep, bucket, region)
            if rec is not None and not dry_run:
                key = s_obj.key if s_obj is not None else c_obj.source_key  # type: ignore[union-attr]
                span = trace.root("scan.object", attributes=trace.attrs(dc=site.name, key=f"{bucket}/{key}",
                                                                        route=r.name, found=_found(s_obj, c_obj)))
                with kafka_errors("publish scan event"):
                    send_step(site.producer, site.topics.events, key=message_key(bucket, key),
                              value=encode_notification([rec]), parent=span, starts_object=True,
                              attributes=trace.attrs(dc=site.name, key=f"{bucket}/{key}"))
                trace.end(span)
                rep.events += 1
    if not dry_run:
        with kafka_errors("flush scan events"):
            site.producer.flush(timeout=60)
    return rep


def _found(s_obj: ObjectInfo | None, c_obj: CatalogEntry | None) -> str:
    return "missing" if c_obj is None else "extra" if s_obj is None else "differ"


def _scan_record(s_obj: ObjectInfo | None, c_obj: CatalogEntry | None, rep: ScanReport, bucket: str,
                 region: str) -> dict[str, Any] | None:
    if s_obj is not None and c_obj is None:
        rep.missing += 1
    elif s_obj is not None and c_obj is not None and s_obj.etag != c_obj.source_etag:
        rep.differ += 1
    elif s_obj is None and c_obj is not None:
        rep.extra += 1
        return reconcile_record("delete", bucket, c_obj.source_key, region=region)
    else:
        return None
    assert s_obj is not None
    return reconcile_record("put", bucket, s_obj.key, size=s_obj.size, etag=s_obj.etag, region=region)
