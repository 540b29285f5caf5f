"""Release trigger: a dataset-release event starts a prewarm in each datacenter it names.

`ReleaseFollower` runs in one datacenter (its own consumer group, `prewarm` role) on the consume
loop, over the releases topics of every datacenter. A release whose `datacenters` include this one
(or, when empty, the config's prewarm datacenters) is prewarmed here through the same pipeline
the CLI and the DAG use. A prewarm that fails for a reason that may pass (files not mirrored yet,
a store or broker away) is retried with backoff; after `prewarm.release_attempts` tries, or at
once for a permanent reason (a malformed release, an unreadable list), the release goes to the
dead-letter topic with the reason. The offset is committed only after one of the two.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from cache_client.prewarm.pipeline import PrewarmReport, Request, run_prewarm
from xdc import trace
from xdc.events import ReleaseEvent, parse_message
from xdc.io.consume import Batch, ConsumeLoop, Letter, Source
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import kafka_errors, send_step
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
    return Request(release.manifest, release.dataset, release.version, release.prefix, release.deadline)


class ReleaseFollower:
    """Consume-loop handler: one release at a time, prewarmed into `topology.here`."""

    def __init__(self, topology: Topology, *, group_id: str | None = None) -> None:
        self.topology = topology
        self.site = topology.here
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
                if isinstance(ev, ReleaseEvent) and wants(self.site, ev):
                    report = run_prewarm(self.site, request_of(ev), trace_parent=trace.from_headers(rec.headers))
                    self.reports.append(report)
        return []

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
