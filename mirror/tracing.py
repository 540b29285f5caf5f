"""The mirror's spans, kept apart from the apply path so that it reads top to bottom.

Per batch a `mirror.batch` span (links to the traced objects in it). Per object whose event carries
a sampled trace (or, with no traceparent at all, one sampled here): `mirror.apply`, a child of the
event's `kafka.publish`, from the moment the batch was consumed to its applied event published,
with the steps under it: `mirror.copy` with `s3.source_read`, `s3.transfer`, `s3.target_write`
under it (opened by the copy engine for the batch's copies, whose jobs carry the `mirror.apply`
span as their parent; by `bound` and the store for deletes and reconciliations), `state.commit` (the batch's transaction) and `applied.publish` (the outbox
flush). The applied message carries each object's context (`xdc.trace.keyed_headers`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from xdc import trace
from xdc.io.consume import Batch
from xdc.io.state import CatalogEntry
from xdc.routing import Routed

T = TypeVar("T")


class BatchTrace:
    """The spans of one batch; a no-op when nothing in it is traced."""

    def __init__(self, dc: str, batch: Batch) -> None:
        self.dc = dc
        self.batch = batch
        self.t0 = time.time()  # consumed
        self.spans: dict[int, Any] = {}  # id(Routed) -> its mirror.apply span
        self.keys: dict[int, str] = {}
        self.span: Any = None

    def begin(self, items: Sequence[Routed]) -> None:
        if not trace.active():
            return
        for it in items:  # most are not traced: nothing is built for them
            s = trace.entry("mirror.apply", it.record.headers, start_time=self.t0,
                            attributes=lambda it=it: self._attributes(it))  # type: ignore[misc]
            if s is not None:
                self.spans[id(it)] = s
                self.keys[id(it)] = f"{it.target_bucket}/{it.target_key}"
        self.span = trace.root("mirror.batch", always=bool(self.spans), start_time=self.t0,
                               links=[trace.context_of(s) for s in self.spans.values()],  # type: ignore[misc]
                               attributes=trace.attrs(dc=self.dc, source_dc=self.batch.source,
                                                      records=len(self.batch), objects=len(items)))

    def _attributes(self, it: Routed) -> dict[str, Any]:
        return trace.attrs(dc=self.dc, key=f"{it.target_bucket}/{it.target_key}", source_dc=it.route.source.dc,
                           source_key=f"{it.event.bucket}/{it.event.key}", route=it.route.name, op=it.event.op,
                           event_time=it.event.event_time, mode=it.route.mode,
                           **{"messaging.kafka.partition": it.record.partition,
                              "messaging.kafka.offset": it.record.offset})

    def parent(self, it: Routed) -> Any:
        """The item's `mirror.apply` span, the parent of its copy on the copy engine (None: not traced)."""
        return self.spans.get(id(it))

    def bound(self, it: Routed, fn: Callable[[Routed], T]) -> Callable[[Routed], T]:
        """`fn` (a copy or delete, run in a pool thread) as the `mirror.copy` step of the item."""
        span = self.spans.get(id(it))
        if span is None:
            return fn

        def run(item: Routed) -> T:
            with trace.use(span), trace.step(trace.COPY, dc=self.dc, key=self.keys[id(it)]):
                return fn(item)
        return run

    def headers(self, items: Iterable[Routed]) -> list[tuple[str, bytes]]:
        """Headers of the applied message about these objects: each traced one's context."""
        ctxs = {self.keys[id(it)]: trace.context_of(self.spans[id(it)]) for it in items if id(it) in self.spans}
        return trace.keyed_headers(ctxs)  # type: ignore[arg-type]

    def finish(self, done: Sequence[tuple[Routed, CatalogEntry]], applied: Sequence[CatalogEntry],
               t_commit: float, t_committed: float, t_published: float, error: str | None = None) -> None:
        """The batch's commit and publish as steps of each traced object; end their spans."""
        if not self.spans:
            trace.end(self.span)
            return
        applied_ids = {id(e) for e in applied}
        copied = {id(it): e for it, e in done}
        for iid, span in self.spans.items():
            e = copied.get(iid)
            if e is None:  # dead-lettered, superseded or waiting for an endpoint: no state row
                trace.end(span, end_time=t_committed, error=error or "not applied (see the batch's dead letters)")
                continue
            trace.record("state.commit", span, t_commit, t_committed,
                         attributes=trace.attrs(dc=self.dc, key=self.keys[iid], applied=id(e) in applied_ids))
            if id(e) in applied_ids:
                trace.record("applied.publish", span, t_committed, t_published,
                             attributes=trace.attrs(dc=self.dc, key=self.keys[iid]))
            trace.end(span, end_time=t_published, attributes={"xdc.applied_time": e.applied_time,
                                                              "xdc.applied": id(e) in applied_ids})
        trace.end(self.span, end_time=t_published)
