"""The release reconciler: every release owed to a datacenter gets a result there.

Three records are compared for one site:

    releases topics (every datacenter's, read whole, no consumer group: nothing is committed)
    release ledger  (what the follower and the DAG saw here, and the outcome)
    registrations   (datasets made active, or retired, in the site's state by any path)

A release that wants this datacenter and has neither an outcome in the ledger nor a registration
(active or retired) is owed: the follower was never given it (the Airflow trigger commits its
offset before the asset event is stored, so a triggerer crash there loses it), or a run died
before it recorded anything. Each owed release is driven again through the one prewarm pipeline,
once per reconcile: a try that fails for a reason that may pass leaves it pending for the next
reconcile, a permanent failure is recorded as `failed`. Releases published or tried less than
`prewarm.reconcile_after_seconds` ago are left to whoever is on them.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cache_client.prewarm.release import origin_of, prewarm_release, wants
from xdc.errors import EventError, XdcError
from xdc.events import ReleaseEvent, parse_message, parse_release
from xdc.io.consume import Batch, ConsumeLoop, Letter, Source
from xdc.io.kafka import TopicPartition, kafka_errors
from xdc.io.state import LedgerEntry
from xdc.topology import Site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owed:
    """A release without a result in the site, and where it was found."""

    release: ReleaseEvent
    origin: str  # the Kafka delivery, or the ledger entry's origin
    published: float  # Kafka timestamp (or the ledger's last update), epoch seconds

    @property
    def label(self) -> str:
        return f"{self.release.dataset}@{self.release.version}"


@dataclass
class ReconcileReport:
    dc: str
    on_topics: int = 0  # releases on the topics that want this datacenter
    malformed: int = 0  # messages on the topics that are not valid releases
    in_ledger: int = 0  # of those wanted here, with an outcome in the ledger
    registered: int = 0  # of those wanted here, with a registration and no ledger outcome
    recent: list[str] = field(default_factory=list)  # owed, but too recent to touch
    redriven: list[dict[str, Any]] = field(default_factory=list)  # {release, origin, outcome, detail}

    def to_dict(self) -> dict[str, Any]:
        return {"dc": self.dc, "on_topics": self.on_topics, "malformed": self.malformed,
                "in_ledger": self.in_ledger, "registered": self.registered, "recent": self.recent,
                "redriven": self.redriven}

    def summary(self) -> str:
        outcomes: dict[str, int] = {}
        for r in self.redriven:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        return (f"reconcile {self.dc}: {self.on_topics} releases on the topics, {self.in_ledger} with an outcome, "
                f"{self.registered} registered by another path, {len(self.redriven)} driven again {outcomes or ''}, "
                f"{len(self.recent)} too recent")


class _Collect:
    def __init__(self) -> None:
        self.found: list[tuple[ReleaseEvent, str, float]] = []
        self.malformed = 0

    def handle(self, batch: Batch) -> Sequence[Letter]:
        for rec in batch.records:
            try:
                events = parse_message(rec.value)
            except EventError:
                self.malformed += 1  # the follower dead-letters it; nothing to warm
                continue
            for ev in events:
                if isinstance(ev, ReleaseEvent):
                    self.found.append((ev, origin_of(batch.source, rec), rec.timestamp_ms / 1000.0))
        return []


def releases_on_topics(site: Site, *, max_seconds: float = 120.0) -> tuple[list[tuple[ReleaseEvent, str, float]], int]:
    """Every release on the releases topics of every datacenter, read from `site` without a group:
    (release, origin, publish time) oldest first per partition, and the count of malformed messages."""
    sources = []
    for s in site.topology.sites:
        topic = s.topics.releases
        consumer = s.consumer(None)
        with kafka_errors(f"assign {topic} of {s.name}"):
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
        sources.append(Source(s.name, consumer, None))
    collect = _Collect()
    loop = ConsumeLoop(sources, collect, name="reconcile", poll_timeout_s=0.3)
    try:
        loop.run(once=True, max_seconds=max_seconds)
    finally:
        loop.close()
    return collect.found, collect.malformed


def owed_releases(site: Site, report: ReconcileReport | None = None) -> list[Owed]:
    """Releases that want `site` and have no result there, newest delivery per dataset@version."""
    rep = report if report is not None else ReconcileReport(site.name)
    found, rep.malformed = releases_on_topics(site)
    ledger = {(e.dataset, e.version): e for e in site.state.releases.entries()}
    registered = {(g.dataset, g.version) for g in site.state.prewarm.registrations() if g.state in ("active", "retired")}
    latest: dict[tuple[str, str], Owed] = {}
    for ev, origin, published in found:
        if not wants(site, ev):
            continue
        rep.on_topics += 1
        key = (ev.dataset, ev.version)
        entry = ledger.get(key)
        if entry is not None and entry.has_result and not _newer_delivery(entry, origin, published):
            rep.in_ledger += 1
            continue
        if key in registered and (entry is None or entry.has_result):
            rep.registered += 1
            continue
        latest[key] = Owed(ev, origin, published)
    for key, entry in ledger.items():  # pending entries whose message is gone from the topic (retention)
        if entry.state == "pending" and key not in latest and key not in registered:
            owed = _from_ledger(entry)
            if owed is not None and wants(site, owed.release):
                latest[key] = owed
    return list(latest.values())


def _newer_delivery(entry: LedgerEntry, origin: str, published: float) -> bool:
    """A delivery other than the one the outcome belongs to, published after it (a release sent again)."""
    return origin != entry.origin and published > entry.updated


def _from_ledger(entry: LedgerEntry) -> Owed | None:
    try:
        return Owed(parse_release(dict(entry.payload)), entry.origin, entry.updated)
    except EventError:
        return None


def reconcile(site: Site, *, grace_s: float | None = None, dry_run: bool = False,
              now: float | None = None) -> ReconcileReport:
    """Drive again every release owed to `site` (see the module doc); `dry_run` only reports."""
    grace = site.topology.config.prewarm.reconcile_after_seconds if grace_s is None else grace_s
    rep = ReconcileReport(site.name)
    ledger = site.state.releases
    for owed in owed_releases(site, rep):
        t = time.time() if now is None else now
        entry = ledger.get(owed.release.dataset, owed.release.version)
        last = max(owed.published, entry.updated if entry is not None else 0.0)
        if t - last < grace:
            rep.recent.append(owed.label)
            continue
        row: dict[str, Any] = {"release": owed.label, "origin": owed.origin}
        rep.redriven.append(row)
        if dry_run:
            row.update(outcome="dry_run", detail="")
            continue
        log.warning("release %s (%s) has no result in %s: driving it again", owed.label, owed.origin, site.name)
        ledger.seen(owed.release.dataset, owed.release.version, owed.release.to_dict(), owed.origin)
        try:
            report = prewarm_release(site, owed.release)
        except XdcError as exc:
            if not exc.retriable:
                ledger.finish(owed.release.dataset, owed.release.version, "failed", f"{type(exc).__name__}: {exc}")
            row.update(outcome="pending" if exc.retriable else "failed", detail=str(exc)[:500])
            continue
        row.update(outcome="warm" if report.complete else "incomplete", detail=report.summary())
    log.info("%s", rep.summary())
    return rep
