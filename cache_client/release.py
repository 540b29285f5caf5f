"""Release trigger: a dataset-release event starts a prewarm in each datacenter it names.

`follow_releases` runs in one datacenter (its own consumer group) and consumes the releases topics of
every datacenter; a release whose `datacenters` include this one (or, when empty, the config's
prewarm datacenters) is prewarmed here through the same `run_prewarm` the CLI and the DAG use.
Offsets are committed after the prewarm report is in.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cache_client.prewarm import PrewarmReport, run_prewarm
from mirror.events import ReleaseEvent, parse_message
from xdc.config import XdcConfig
from xdc.errors import EventError, XdcError
from xdc.kafka import commit, kafka_errors, make_consumer, make_producer, to_records

log = logging.getLogger(__name__)


def fetch_manifest(cfg: XdcConfig, dc: str, uri: str, dest: Path) -> Path:
    """A local path as it is; s3://bucket/key is read from `dc`'s store (mirrored there too)."""
    if not uri.startswith("s3://"):
        return Path(uri)
    from xdc.store import store_for
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    out = dest / Path(key).name
    out.write_bytes(store_for(cfg, dc).get(bucket, key))
    return out


def publish_release(cfg: XdcConfig, dc: str, release: ReleaseEvent) -> None:
    """Publish a release on `dc`'s releases topic."""
    p = make_producer(cfg.brokers(dc))
    try:
        with kafka_errors("publish release"):
            p.send(cfg.dc(dc).kafka.topics.releases, key=release.dataset.encode(), value=release.to_json())
            p.flush(timeout=30)
    finally:
        p.close(timeout=5)


def wants(cfg: XdcConfig, dc: str, release: ReleaseEvent) -> bool:
    return dc in (release.datacenters or tuple(cfg.prewarm_datacenters()))


def prewarm_release(cfg: XdcConfig, dc: str, release: ReleaseEvent, **kw: Any) -> PrewarmReport:
    with tempfile.TemporaryDirectory(prefix="xdc-manifest-") as tmp:
        path = fetch_manifest(cfg, dc, release.manifest, Path(tmp))
        return run_prewarm(cfg.with_local_dc(dc), dc, path, release.dataset, version=release.version,
                           prefix=release.prefix, **kw)


def follow_releases(cfg: XdcConfig, dc: str, *, once: bool = False, max_seconds: float | None = None,
                    stop: threading.Event | None = None, group_id: str | None = None) -> list[PrewarmReport]:
    cfg = cfg.with_local_dc(dc)
    k = cfg.dc(dc).kafka
    reports: list[PrewarmReport] = []
    consumers = [make_consumer(cfg.brokers(src), group_id or f"{cfg.prewarm.group_id}.{dc}",
                               [cfg.dc(src).kafka.topics.releases], session_timeout_ms=k.session_timeout_ms,
                               heartbeat_interval_ms=k.heartbeat_interval_ms)
                 for src in cfg.datacenters]
    t0 = time.monotonic()
    idle = 0
    try:
        while not (stop and stop.is_set()):
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                break
            got = False
            for c in consumers:
                with kafka_errors("poll releases"):
                    records = to_records(c.poll(timeout_ms=500, max_records=10))
                for rec in records:
                    got = True
                    try:
                        events = parse_message(rec.value)
                    except EventError as exc:
                        log.warning("release topic: bad message at %s[%d]@%d: %s", rec.topic, rec.partition,
                                    rec.offset, exc)
                        continue
                    for ev in events:
                        if isinstance(ev, ReleaseEvent) and wants(cfg, dc, ev):
                            try:
                                rep = prewarm_release(cfg, dc, ev)
                            except XdcError as exc:  # a release that cannot be warmed must not stop the rest
                                log.error("prewarm %s@%s in %s failed: %s", ev.dataset, ev.version, dc, exc)
                                continue
                            log.info("%s", rep.summary())
                            reports.append(rep)
                commit(c, records)
            idle = 0 if got else idle + 1
            joined = all(c.assignment() for c in consumers)
            if once and joined and idle >= 2:
                break
            if once and not joined and time.monotonic() - t0 > 60:
                break
    finally:
        for c in consumers:
            c.close(autocommit=False)
    return reports
