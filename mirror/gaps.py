"""Offset gaps found by the consume loop for the mirror: recorded, counted, healed.

    gap (xdc.io.consume, before the partition is read) -> record (state: status "pending")
    -> xdc_event_gaps_total -> verify --repair of each route the topic feeds (a thread of its own)
    -> reconciliations on the source's events topic -> the mirror applies them -> "repaired"

The repair runs in a background thread, not in the consume loop: a verify lists a whole route on
both sides, which on millions of objects takes longer than the group's max.poll.interval, and the
events after the gap would wait for it. So the loop goes on applying them while the verify runs,
and its reconciliations reach the mirror through the same topic, behind them. A verify that meets
an object whose event is still in flight publishes a reconciliation that was not needed: harmless,
a reconciliation reads the source's current state and makes the target match.

Restarts: a gap stays "pending" until the verify of every route it feeds has published its
repairs (flushed to Kafka, so the mirror applies them at least once); a mirror that starts, and
one whose repair failed (an endpoint away), drives its group's pending gaps again. A verify with
repair is idempotent: running it twice costs time, not correctness.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from mirror.verify import VerifyReport, verify_route
from xdc.config import Route
from xdc.io.offset_gaps import OffsetGap
from xdc.io.state import Gap
from xdc.metrics import Metrics
from xdc.topology import Topology

log = logging.getLogger(__name__)

PENDING = "verify --repair pending"


class GapHealer:
    def __init__(self, topology: Topology, group: str, routes: Sequence[Route], metrics: Metrics,
                 retry_s: float = 60.0) -> None:
        self.topology = topology
        self.group = group
        self.routes = list(routes)
        self.metrics = metrics
        self.incidents = topology.here.state.incidents
        self.retry_s = retry_s
        self.repairs_published = 0  # reconciliations published by this process's repairs
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again = False  # gaps recorded while a repair ran: look again when it ends
        self._failed_at: float | None = None

    def record(self, source: str, gaps: Sequence[OffsetGap]) -> None:
        """The consume loop's `on_gaps`: durable rows first (the loop acknowledges the gaps in the
        group after this returns), then the repair starts."""
        routes = tuple(r.name for r in self.routes if r.source.dc == source)
        for g in gaps:
            new = self.incidents.record_gap(Gap(self.group, g.topic, g.partition, g.committed, g.log_start,
                                                g.lost, routes, PENDING))
            if new:
                self.metrics.event_gaps_total.labels(g.topic).inc()
                if g.lost:
                    self.metrics.event_gap_lost_offsets_total.labels(g.topic).inc(g.lost)
        self.drive()

    def resume(self) -> None:
        """At start: drive the pending gaps a previous process left (no thread when there are none)."""
        try:
            pending = bool(self.incidents.open_gaps(self.group))
        except Exception as exc:  # noqa: BLE001 - the state away at start: on_idle tries again
            log.warning("pending gaps of group %s unknown (%r); looked at again in %.0fs", self.group, exc, self.retry_s)
            self._failed_at = time.monotonic()
            return
        if pending:
            self.drive()

    def drive(self) -> None:
        """Repair the group's pending gaps in the background, unless a repair runs already."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._again = True
                return
            self._again = False
            self._thread = threading.Thread(target=self._repair_all, name="gap-repair", daemon=True)
            self._thread.start()

    def on_idle(self) -> None:
        """Try a failed repair again after `retry_s`."""
        if self._failed_at is not None and time.monotonic() - self._failed_at >= self.retry_s:
            self._failed_at = None
            self.drive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the running repair; True when none runs any more."""
        t = self._thread
        if t is not None:
            t.join(timeout_s)
            return not t.is_alive()
        return True

    def _repair_all(self) -> None:
        while True:
            try:
                self._repair_once()
            except Exception:  # the rows stay pending: tried again later
                log.exception("gap repair of group %s failed; tried again in %.0fs", self.group, self.retry_s)
                self._failed_at = time.monotonic()
            with self._lock:
                if not self._again:
                    return
                self._again = False

    def _repair_once(self) -> None:
        rows = self.incidents.open_gaps(self.group)
        if not rows:
            return
        names = sorted({n for row in rows for n in row["routes"].split(",") if n})
        by_name = {r.name: r for r in self.routes}
        done: dict[str, VerifyReport] = {}
        failed: dict[str, str] = {}
        gone = {n for n in names if n not in by_name}  # a route removed from the config since
        for name in sorted(set(names) - gone):  # one verify per route, however many of its partitions had a gap
            route = by_name[name]
            try:
                rep = verify_route(self.topology, route, repair=True, trigger="gap", metrics=self.metrics)
            except Exception as exc:  # noqa: BLE001 - an endpoint away: this route's gaps stay pending
                log.warning("gap repair: verify of route %s failed: %r", name, exc)
                failed[name] = repr(exc)
                continue
            done[name] = rep
            self.repairs_published += rep.repaired
        for row in rows:
            routes = [n for n in row["routes"].split(",") if n]
            if any(n in failed for n in routes):
                continue
            if any(n in gone for n in routes):
                self.incidents.finish_gap(row["id"], "failed", f"routes no longer configured: {sorted(gone)}")
                continue
            what = "; ".join(f"{n}: {done[n].missing} missing, {done[n].extra} extra, {done[n].differ} differ, "
                             f"{done[n].repaired} repairs published" for n in routes)
            self.incidents.finish_gap(row["id"], "repaired", "verify --repair: " + (what or "no routes"))
            log.info("gap on %s[%s] repaired: %s", row["topic"], row["part"], what)
        if failed:
            self._failed_at = time.monotonic()
