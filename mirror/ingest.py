"""Sources of events: `ingest` uploads files and publishes what a bucket notification would;
`scan` diffs a bucket against the catalog and publishes events for changes that were missed.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.catalog import CatalogEntry, SqliteCatalog
from mirror.events import encode_notification, message_key, new_sequencer, s3_record, validate_key
from mirror.march import march
from xdc.config import XdcConfig
from xdc.errors import ConfigError
from xdc.kafka import kafka_errors, make_producer
from xdc.store import ObjectInfo, Store, store_for

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


def ingest(cfg: XdcConfig, dc: str, src_dir: str | Path, bucket: str, prefix: str = "", *,
           concurrency: int = 8, progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Upload every file under src_dir to dc's bucket/prefix, then publish one S3 event per object
    on dc's events topic (keyed by bucket/key, so one object's events stay in order)."""
    cfg = cfg.with_local_dc(dc)
    root = Path(src_dir)
    if not root.is_dir():
        raise ConfigError(f"ingest: not a directory: {root}")
    store = store_for(cfg, dc)
    store.ensure_bucket(bucket)
    k = cfg.dc(dc).kafka
    producer = make_producer(cfg.brokers(dc))
    rep = IngestReport()
    t0 = time.monotonic()
    paths = list(_files(root))

    def upload(p: Path) -> ObjectInfo:
        key = validate_key(prefix + p.relative_to(root).as_posix())
        return store.put(bucket, key, p.read_bytes())

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for info in pool.map(upload, paths):
                rec = s3_record("put", bucket, info.key, size=info.size, etag=info.etag,
                                region=cfg.dc(dc).s3.region)
                with kafka_errors("publish event"):
                    producer.send(k.topics.events, key=message_key(bucket, info.key),
                                  value=encode_notification([rec]))
                rep.files += 1
                rep.bytes += info.size
                rep.events += 1
                if progress:
                    progress(rep.files, len(paths))
        with kafka_errors("flush events"):
            producer.flush(timeout=60)
    finally:
        producer.close(timeout=5)
    rep.seconds = time.monotonic() - t0
    return rep


def publish_delete(cfg: XdcConfig, dc: str, bucket: str, key: str, *, delete_object: bool = True) -> None:
    """Delete an object in dc and publish the ObjectRemoved event a notification would."""
    cfg = cfg.with_local_dc(dc)
    if delete_object:
        store_for(cfg, dc).delete(bucket, key)
    producer = make_producer(cfg.brokers(dc))
    try:
        with kafka_errors("publish delete"):
            producer.send(cfg.dc(dc).kafka.topics.events, key=message_key(bucket, key),
                          value=encode_notification([s3_record("delete", bucket, key)]))
            producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)


@dataclass
class ScanReport:
    listed: int = 0
    missing: int = 0  # in the source, not (or not this version) in the target catalog
    differ: int = 0
    extra: int = 0  # live in the catalog, gone from the source
    events: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def scan(cfg: XdcConfig, dc: str, bucket: str, prefix: str = "", *, dry_run: bool = False) -> ScanReport:
    """For each route out of dc covering bucket/prefix: list the source, march it against the
    target's catalog, and publish put events for missing or changed objects and delete events
    for objects the catalog holds that the source no longer has."""
    cfg = cfg.with_local_dc(dc)
    routes = [r for r in cfg.routes_from(dc) if r.source.bucket == bucket
              and (r.source.prefix.startswith(prefix) or prefix.startswith(r.source.prefix))]
    if not routes:
        raise ConfigError(f"scan: no route from {dc}:{bucket}/{prefix}")
    store: Store = store_for(cfg, dc)
    k = cfg.dc(dc).kafka
    rep = ScanReport()
    producer = None if dry_run else make_producer(cfg.brokers(dc))
    try:
        for r in routes:
            pfx = max(prefix, r.source.prefix, key=len)
            catalog = SqliteCatalog(cfg.catalog_path(r.target.dc))
            try:
                src = store.list(bucket, pfx)
                dst = catalog.iter_route(r.name, pfx)
                for s_obj, c_obj in march(src, dst, lambda o: o.key, lambda e: e.source_key):
                    if s_obj is not None:
                        rep.listed += 1
                    rec = _scan_record(s_obj, c_obj, rep, bucket, cfg.dc(dc).s3.region)
                    if rec is not None and producer is not None:
                        key = s_obj.key if s_obj is not None else c_obj.source_key  # type: ignore[union-attr]
                        with kafka_errors("publish scan event"):
                            producer.send(k.topics.events, key=message_key(bucket, key),
                                          value=encode_notification([rec]))
                        rep.events += 1
            finally:
                catalog.close()
        if producer is not None:
            producer.flush(timeout=60)
    finally:
        if producer is not None:
            producer.close(timeout=5)
    return rep


def _scan_record(s_obj: ObjectInfo | None, c_obj: CatalogEntry | None, rep: ScanReport, bucket: str,
                 region: str) -> dict[str, Any] | None:
    if s_obj is not None and c_obj is None:
        rep.missing += 1
    elif s_obj is not None and c_obj is not None and s_obj.etag != c_obj.source_etag:
        rep.differ += 1
    elif s_obj is None and c_obj is not None:
        rep.extra += 1
        return s3_record("delete", bucket, c_obj.source_key, sequencer=new_sequencer(), region=region)
    else:
        return None
    assert s_obj is not None
    return s3_record("put", bucket, s_obj.key, size=s_obj.size, etag=s_obj.etag, sequencer=new_sequencer(),
                     event_time=s_obj.last_modified or time.time(), region=region)
