"""Pure apply logic: route an event, collapse a batch per key, decide against the catalog.

No I/O here: the runner feeds records in and acts on the decisions.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from mirror.catalog import CatalogEntry
from xdc.events import ObjectEvent, validate_key
from xdc.config import Route
from xdc.errors import EventError
from xdc.io.kafka import Record

Decision = Literal["apply", "stale", "duplicate"]


@dataclass(frozen=True)
class Routed:
    event: ObjectEvent
    route: Route
    target_bucket: str
    target_key: str
    record: Record  # where it came from, for the dead-letter topic and offsets


def route_event(event: ObjectEvent, routes: Sequence[Route], record: Record,
                max_key_bytes: int = 1024) -> Routed | None:
    """The route that covers the event, or None. The target key is re-checked so that a crafted
    key can never land outside the route's target bucket and prefix."""
    for r in routes:
        if r.source.covers(event.bucket, event.key):
            tkey = validate_key(r.target_key(event.key), max_key_bytes)
            if not tkey.startswith(r.target.prefix):
                raise EventError("escapes_target", f"{event.key!r} maps outside {r.target.prefix!r}")
            return Routed(event, r, r.target.bucket, tkey, record)
    return None


def collapse(items: Iterable[Routed]) -> list[Routed]:
    """Keep the newest event per target key (by sequencer); the final state is what matters.
    Ties keep the first seen, so a batch delivered twice collapses to the same event."""
    best: dict[tuple[str, str], Routed] = {}
    for it in items:
        k = (it.target_bucket, it.target_key)
        cur = best.get(k)
        if cur is None or it.event.sequencer > cur.event.sequencer:
            best[k] = it
    return list(best.values())


def decide(item: Routed, current: CatalogEntry | None) -> Decision:
    """Apply only what is newer than what the catalog holds for that key."""
    if current is None:
        return "apply"
    if item.event.sequencer > current.sequencer:
        return "apply"
    if item.event.sequencer == current.sequencer:
        return "duplicate"
    return "stale"


def entry_for(item: Routed, *, applied_time: float, size: int | None = None,
              etag: str | None = None) -> CatalogEntry:
    ev = item.event
    return CatalogEntry(
        bucket=item.target_bucket, key=item.target_key,
        size=ev.size if size is None else size, etag=ev.etag if etag is None else etag,
        sequencer=ev.sequencer, deleted=ev.op == "delete", event_time=ev.event_time,
        applied_time=applied_time, route=item.route.name, mode=item.route.mode,
        source_dc=item.route.source.dc, source_bucket=ev.bucket, source_key=ev.key, source_etag=ev.etag)
