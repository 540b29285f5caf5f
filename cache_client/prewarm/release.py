"""Release trigger: a dataset-release event starts a prewarm in each datacenter it names.

`ReleaseFollower` runs in one datacenter (its own consumer group, `prewarm` role) on the consume
loop, over the releases topics of every datacenter. Every release it sees is recorded in the
datacenter's release ledger (`Site.state.releases`); one whose `datacenters` include this one (or,
when empty, the config's prewarm datacenters) is prewarmed here through the same pipeline the CLI
and the DAG use. A prewarm that fails for a reason that may pass (files or the list not mirrored
yet, a store or broker away) is retried with capped backoff; after `prewarm.release_attempts`
tries, or at once for a permanent reason (a malformed release, a list that cannot be parsed), the
release goes to the dead-letter topic with the reason. The offset is committed only after one of
the two, and the ledger holds the outcome (warm, incomplete, dead_lettered) before the commit.
What has no outcome is found and driven again by the reconciler (`reconcile.py`).
`dataset.ready` events share the releases topics: the follower reads them and does nothing.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from cache_client.prewarm.pipeline import PrewarmReport, Request, run_prewarm
from xdc import trace
from xdc.errors import EventError, XdcError
from xdc.events import ReleaseEvent, parse_message
from xdc.faults import crash_point
from xdc.io.consume import Batch, ConsumeLoop, Letter, Source
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import Record, kafka_errors, send_step
from xdc.metrics import METRICS
from xdc.retry import RetryPolicy
from xdc.topology import Site, Topology

log = logging.getLogger(__name__)


def publish_release(site: Site, release: ReleaseEvent) -> None:
    """Publish a release on the site's releases topic (a trace of its own: releases are few)."""
    attrs = trace.attrs(dc=site.name, dataset=release.dataset, version=release.version)
    span = trace.root("release", always=True, attributes=attrs)
    with kafka_errors("publish release"):
        send_step(site.producer, site.topics.releases, key=release.dataset.encode(), value=release.to_json(),
                  parent=span, attributes=attrs)
        trace.end(span)
        site.producer.flush(timeout=30)


def wants(site: Site, release: ReleaseEvent) -> bool:
    """Is `release` to be warmed in `site`?"""
    names = release.datacenters or tuple(s.name for s in site.topology.prewarm_sites())
    return site.name in names


def request_of(release: ReleaseEvent) -> Request:
    return Request(release.manifest, release.dataset, release.version, release.prefix, release.deadline,
                   select=release.select, root=release.root, make_room=release.make_room)


def origin_of(source: str, rec: Record) -> str:
    """Where a delivery came from, as the ledger keeps it: `<dc>:<topic>[<partition>]@<offset>`."""
    return f"{source}:{rec.topic}[{rec.partition}]@{rec.offset}"


def prewarm_release(site: Site, release: ReleaseEvent, *, trace_parent: trace.Parent = None) -> PrewarmReport:
    """One try at a release the ledger holds as pending: counted, its error noted, its outcome
    recorded (warm or incomplete). Errors are raised as they are: the caller decides on retries.
    `trace_parent`: the release message's trace context (the reconciler's re-drives have none)."""
    ledger = site.state.releases
    ledger.attempt(release.dataset, release.version)
    try:
        report = run_prewarm(site, request_of(release), publish_ready="must", trace_parent=trace_parent)
    except XdcError as exc:
        ledger.note(release.dataset, release.version, f"{type(exc).__name__}: {exc}")
        raise
    crash_point("releases.after_warm")  # warm, outcome not yet in the ledger
    ledger.finish(release.dataset, release.version, "warm" if report.complete else "incomplete", report.summary())
    return report


class ReleaseFollower:
    """Consume-loop handler: one release at a time, prewarmed into `topology.here`."""

    def __init__(self, topology: Topology, *, group_id: str | None = None) -> None:
        self.topology = topology
        self.site = topology.here
        self.ledger = self.site.state.releases
        self.reports: list[PrewarmReport] = []
        p = topology.config.prewarm
        group = group_id or self.site.group("prewarm")
        sources = [Source(s.name, s.consumer(group), group, (s.topics.releases,)) for s in topology.sites]
        self.loop = ConsumeLoop(
            sources, self, name="releases", max_records=1, poll_timeout_s=0.5,
            retry=RetryPolicy(max_attempts=p.release_attempts, base_s=p.release_retry_seconds, cap_s=60.0),
            dead_letters=DeadLetterSink(self.site.producer, self.site.topics.dead_letter,
                                        incidents=self.site.state.incidents,
                                        on_letter=lambda t, r: METRICS.dead_letters_total.labels(t, r).inc()))

    def handle(self, batch: Batch) -> Sequence[Letter]:
        for rec in batch.records:
            for ev in parse_message(rec.value):  # EventError: the loop dead-letters it with its reason
                if not isinstance(ev, ReleaseEvent):
                    continue
                origin = origin_of(batch.source, rec)
                if not wants(self.site, ev):
                    self.ledger.seen(ev.dataset, ev.version, ev.to_dict(), origin, state="not_here")
                    continue
                entry = self.ledger.seen(ev.dataset, ev.version, ev.to_dict(), origin)
                if entry.has_result:  # done before a crash kept the offset from being committed
                    log.info("release %s@%s at %s is %s here already", ev.dataset, ev.version, origin, entry.state)
                    continue
                self.reports.append(prewarm_release(self.site, ev, trace_parent=trace.from_headers(rec.headers)))
        return []

    def on_letters(self, source: str, letters: Sequence[Letter]) -> None:
        """A release sent to the dead-letter topic has that outcome in the ledger too."""
        for x in letters:
            try:
                events = parse_message(x.record.value)
            except EventError:
                continue  # not a release anyone could name
            for ev in events:
                if isinstance(ev, ReleaseEvent) and wants(self.site, ev):
                    self.ledger.seen(ev.dataset, ev.version, ev.to_dict(), origin_of(source, x.record))
                    self.ledger.finish(ev.dataset, ev.version, "dead_lettered", f"{x.reason}: {x.detail}")

    def run(self, *, once: bool = False, max_seconds: float | None = None,
            stop: threading.Event | None = None) -> list[PrewarmReport]:
        self.loop.run(once=once, max_seconds=max_seconds, stop=stop)
        return self.reports

    def close(self) -> None:
        self.loop.close()

    def __enter__(self) -> ReleaseFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow_releases(topology: Topology, *, once: bool = False, max_seconds: float | None = None,
                    stop: threading.Event | None = None, group_id: str | None = None) -> list[PrewarmReport]:
    with ReleaseFollower(topology, group_id=group_id) as f:
        return f.run(once=once, max_seconds=max_seconds, stop=stop)
