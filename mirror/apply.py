"""Pure apply logic: what a batch asks of each target key, decided against the state.

No I/O here: the runner feeds routed events in (`xdc.routing`) and acts on the decisions.

Two kinds of content events reach a key (see README "Guarantees", repairs):
- an S3 event carries the store's sequencer: within a batch the newest per key wins; across
  batches it applies only when newer than the sequencer the state holds (stale or duplicate
  otherwise);
- a reconciliation (scan, verify --repair, gap repair, ingest into a store without
  notifications) has no sequencer to compare: it never loses and never wins a comparison; its
  apply reads the source's current state and makes the target match it, and the state keeps the
  newest S3 sequencer seen, so later S3 events of the key are ordered as before.
Tag and ACL events do not change content: they are applied after it, by reading the source's
current tags / ACL, so their order does not matter.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from xdc.io.state import CatalogEntry
from xdc.routing import Routed

Decision = Literal["apply", "stale", "duplicate"]


@dataclass
class KeyWork:
    """One target key's share of a batch."""

    event: Routed | None = None  # the newest S3 put/delete
    reconcile: Routed | None = None  # a reconciliation (the first seen; one read of the source suffices)
    meta: dict[str, Routed] = field(default_factory=dict)  # "tags" / "acl" -> one event of that kind
    superseded: int = 0  # events of the batch that this work makes unnecessary

    @property
    def content(self) -> Routed | None:
        return self.reconcile or self.event

    @property
    def floor(self) -> str:
        """The newest S3 sequencer of the batch for this key ("" when none): a reconciliation
        records it, so the S3 events that come later are still ordered."""
        return self.event.event.sequencer if self.event is not None else ""


def plan_batch(items: Iterable[Routed]) -> dict[tuple[str, str], KeyWork]:
    """Group a batch by target key. S3 content events collapse to the newest by sequencer (ties keep
    the first seen, so a batch delivered twice collapses to the same event)."""
    work: dict[tuple[str, str], KeyWork] = {}
    for it in items:
        w = work.setdefault((it.target_bucket, it.target_key), KeyWork())
        ev = it.event
        if ev.op in ("tags", "acl"):
            if ev.op in w.meta:
                w.superseded += 1
            w.meta[ev.op] = it
        elif ev.reconcile:
            if w.reconcile is not None:
                w.superseded += 1
            else:
                w.reconcile = it
        elif w.event is None:
            w.event = it
        else:
            w.superseded += 1
            if ev.sequencer > w.event.event.sequencer:
                w.event = it
    return work


def collapse(items: Iterable[Routed]) -> list[Routed]:
    """The content event that decides each key (a reconciliation, else the newest S3 event)."""
    return [w.content for w in plan_batch(items).values() if w.content is not None]


def decide(item: Routed, current: CatalogEntry | None) -> Decision:
    """Apply only what is newer than what the catalog holds for that key. A reconciliation always
    applies: it compares nothing, it reads the source."""
    if item.event.reconcile or current is None:
        return "apply"
    if item.event.sequencer > current.sequencer:
        return "apply"
    if item.event.sequencer == current.sequencer:
        return "duplicate"
    return "stale"


def entry_for(item: Routed, *, applied_time: float, size: int | None = None, etag: str | None = None,
              sequencer: str | None = None, deleted: bool | None = None, source_etag: str | None = None,
              tags: str | None = None, origin: str | None = None) -> CatalogEntry:
    ev = item.event
    return CatalogEntry(
        bucket=item.target_bucket, key=item.target_key,
        size=ev.size if size is None else size, etag=ev.etag if etag is None else etag,
        sequencer=ev.sequencer if sequencer is None else sequencer,
        deleted=(ev.op == "delete") if deleted is None else deleted, event_time=ev.event_time,
        applied_time=applied_time, route=item.route.name, mode=item.route.mode,
        source_dc=item.route.source.dc, source_bucket=ev.bucket, source_key=ev.key,
        source_etag=ev.etag if source_etag is None else source_etag,
        origin=origin or ev.origin, tags=tags)
