"""Pure apply logic: collapse a batch per key, decide against the state, the entry to record.

No I/O here: the runner feeds routed events in (`xdc.routing`) and acts on the decisions.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from xdc.io.state import CatalogEntry
from xdc.routing import Routed

Decision = Literal["apply", "stale", "duplicate"]


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
