"""Prometheus metrics of xdc-mirror: one definition per name, shared by every component.

The names and labels here are a contract: the alert rules and the Grafana dashboard under
helm/xdc-mirror/files/ query them by name (a test checks that every name they use is defined here).

Metrics live on a registry of our own, not prometheus_client's global default, so that tests can
build a fresh ``Metrics(new_registry())`` and read exact values. Production code uses ``METRICS``
(on ``REGISTRY``), which ``xdc.observe.http.serve`` exposes on /metrics.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

# Event time -> applied time. Objective (alert) is 60 s p99, so keep buckets dense around it;
# 10 ms for a same-rack copy up to 1 h for a backlog after an outage.
LAG_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0,
    120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, math.inf,
)
# One 4K frame: ~36 ms (JPEG, libvips) to ~300 ms (PNG, Pillow) on this hardware.
RESIZE_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf,
)

RESIZE_RESULTS = ("resized", "skipped", "copied", "quarantined")


def new_registry() -> CollectorRegistry:
    """A fresh, empty registry (no process/platform collectors)."""
    return CollectorRegistry(auto_describe=True)


class Metrics:
    """Every xdc metric, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry

        # --- mirror: replication --------------------------------------------------------------
        self.replication_lag_seconds = Histogram(
            "xdc_replication_lag_seconds",
            "Replication lag: seconds from the S3 event time in the source datacenter to the time "
            "the change was applied in the target datacenter; one observation per applied event.",
            ["route", "source_dc", "target_dc"], buckets=LAG_BUCKETS, registry=r)
        self.replication_applied_through_timestamp_seconds = Gauge(
            "xdc_replication_applied_through_timestamp_seconds",
            "Unix time T such that every change event the source datacenter published before T has been "
            "handled in the target (applied, ignored or dead-lettered). time() minus it bounds the lag of "
            "every event still pending, and keeps growing while the source cannot be reached.",
            ["route", "source_dc", "target_dc"], registry=r)
        self.consumer_lag_messages = Gauge(
            "xdc_consumer_lag_messages",
            "Kafka consumer lag in messages: partition highwater minus the group's committed offset.",
            ["group", "topic", "partition"], registry=r)
        self.objects_pending = Gauge(
            "xdc_objects_pending",
            "Objects changed in the source and not yet applied in the target datacenter (the backlog).",
            ["route"], registry=r)
        self.bytes_pending = Gauge(
            "xdc_bytes_pending",
            "Bytes of the objects counted by xdc_objects_pending.",
            ["route"], registry=r)
        self.events_applied_total = Counter(
            "xdc_events_applied_total",
            "Change events applied to the target datacenter, by operation (put, delete, tags, acl).",
            ["route", "op"], registry=r)
        self.events_failed_total = Counter(
            "xdc_events_failed_total",
            "Change events that failed to apply after retries (they go to the dead-letter topic), by reason.",
            ["route", "reason"], registry=r)
        self.events_ignored_total = Counter(
            "xdc_events_ignored_total",
            "Change events consumed but deliberately not applied, by reason: stale, duplicate, superseded, "
            "echo, families ignored by design (restore, replication, transition, tiering, accessed).",
            ["route", "reason"], registry=r)
        self.conflicts_total = Counter(
            "xdc_conflicts_total",
            "Concurrent writes of one key in both datacenters of a two-way route, settled by the route's "
            "conflict policy (the losing version is kept beside the key), counted by the mirror that "
            "replaced its local version.",
            ["route"], registry=r)
        self.bytes_copied_total = Counter(
            "xdc_bytes_copied_total",
            "Object bytes copied into the target datacenter.",
            ["route"], registry=r)
        self.copies_etag_changed_total = Counter(
            "xdc_copies_etag_changed_total",
            "Objects copied into the target datacenter with another ETag than the source's (their part "
            "layout could not be reproduced; the reason is kept in the state's etag_changes).",
            ["route"], registry=r)
        self.dead_letters_total = Counter(
            "xdc_dead_letters_total",
            "Messages written to a dead-letter topic, by the topic they came from and reason.",
            ["topic", "reason"], registry=r)
        self.event_gaps_total = Counter(
            "xdc_event_gaps_total",
            "Offset gaps found before consuming: partitions of the topic whose committed offset was behind the "
            "log start (retention removed events unread), or with no offset on a log that no longer starts at 0.",
            ["topic"], registry=r)
        self.event_gap_lost_offsets_total = Counter(
            "xdc_event_gap_lost_offsets_total",
            "Offsets (at most one event each) removed from the topic before the group read them, over all gaps.",
            ["topic"], registry=r)
        self.last_apply_timestamp_seconds = Gauge(
            "xdc_last_apply_timestamp_seconds",
            "Unix time of the last change event applied on the route.",
            ["route"], registry=r)
        self.verify_drift_objects = Gauge(
            "xdc_verify_drift_objects",
            "Objects the last verify of the route found missing, extra or different in the target "
            "(source listing vs target listing).",
            ["route"], registry=r)
        self.verify_last_run_timestamp_seconds = Gauge(
            "xdc_verify_last_run_timestamp_seconds",
            "Unix time the last verify of the route finished.",
            ["route"], registry=r)

        # --- resize worker --------------------------------------------------------------------
        self.resize_frames_total = Counter(
            "xdc_resize_frames_total",
            "Frames handled by the resize worker, by result (resized, skipped, copied, quarantined).",
            ["result"], registry=r)
        self.resize_seconds = Histogram(
            "xdc_resize_seconds",
            "Seconds to decode, resize and encode one frame.",
            buckets=RESIZE_BUCKETS, registry=r)
        self.resize_bytes_in_total = Counter(
            "xdc_resize_bytes_in_total",
            "Bytes of source frames read by the resize worker.",
            registry=r)
        self.resize_bytes_out_total = Counter(
            "xdc_resize_bytes_out_total",
            "Bytes of resized frames written by the resize worker.",
            registry=r)

        # --- cache prewarm --------------------------------------------------------------------
        pw = ["dataset", "dc"]
        self.prewarm_files_done = Gauge(
            "xdc_prewarm_files_done", "Files of the dataset's file list warmed into the DC cache so far.", pw, registry=r)
        self.prewarm_files_total = Gauge(
            "xdc_prewarm_files_total", "Files in the dataset's file list to warm into the DC cache.", pw, registry=r)
        self.prewarm_bytes_done = Gauge(
            "xdc_prewarm_bytes_done", "Bytes warmed into the DC cache so far.", pw, registry=r)
        self.prewarm_bytes_total = Gauge(
            "xdc_prewarm_bytes_total", "Bytes of the dataset's file list to warm into the DC cache.", pw, registry=r)
        self.prewarm_eta_seconds = Gauge(
            "xdc_prewarm_eta_seconds",
            "Estimated seconds until the prewarm finishes (0 when done, +Inf while it cannot be estimated).",
            pw, registry=r)
        self.prewarm_deadline_timestamp_seconds = Gauge(
            "xdc_prewarm_deadline_timestamp_seconds",
            "Unix time by which the dataset must be warm in the DC (0 when there is no deadline).",
            pw, registry=r)
        self.cached_ratio = Gauge(
            "xdc_cached_ratio",
            "Fraction (0..1) of the dataset's bytes verified present in the DC cache.",
            pw, registry=r)
        self.dataset_ready = Gauge(
            "xdc_dataset_ready",
            "1 when the dataset is mirrored and warm in the DC (ready for training), else 0.",
            pw, registry=r)

        # --- new problems (xdc.problems) ---------------------------------------------------------
        self.log_problems_total = Counter(
            "xdc_log_problems_total",
            "Log records at WARNING and above, by the component that logged them and their signature "
            "(the message template with its variable parts removed; `xdc problems` lists them).",
            ["component", "signature"], registry=r)
        self.problem_first_seen = Gauge(
            "xdc_problem_first_seen_timestamp_seconds",
            "Unix time a log signature was first seen by any process of the datacenter (from the state).",
            ["component", "signature"], registry=r)

    # Helpers so callers set related series together and with the same label values.

    def set_consumer_lag(self, group: str, topic: str, partition: int, highwater: int, committed: int | None) -> None:
        """Lag = highwater - committed; a group that never committed lags by the whole partition."""
        lag = highwater - (committed if committed is not None and committed >= 0 else 0)
        self.consumer_lag_messages.labels(group, topic, str(partition)).set(max(0, lag))

    def set_prewarm(self, dataset: str, dc: str, *, files_done: int, files_total: int,
                    bytes_done: int, bytes_total: int, eta_seconds: float | None,
                    deadline: float | None = None) -> None:
        """Publish one prewarm progress snapshot (eta None: not estimable yet -> +Inf)."""
        self.prewarm_files_done.labels(dataset, dc).set(files_done)
        self.prewarm_files_total.labels(dataset, dc).set(files_total)
        self.prewarm_bytes_done.labels(dataset, dc).set(bytes_done)
        self.prewarm_bytes_total.labels(dataset, dc).set(bytes_total)
        self.prewarm_eta_seconds.labels(dataset, dc).set(math.inf if eta_seconds is None else max(0.0, eta_seconds))
        self.prewarm_deadline_timestamp_seconds.labels(dataset, dc).set(deadline or 0.0)

    def set_dataset_state(self, dataset: str, dc: str, *, cached_ratio: float, ready: bool) -> None:
        self.cached_ratio.labels(dataset, dc).set(min(1.0, max(0.0, cached_ratio)))
        self.dataset_ready.labels(dataset, dc).set(1 if ready else 0)

    def init_resize_results(self) -> None:
        """Create every result series at 0 so rate() sees the first frame of each result."""
        for result in RESIZE_RESULTS:
            self.resize_frames_total.labels(result)

    def series_labels(self) -> dict[str, frozenset[str]]:
        """Every series name these metrics can expose -> the label names it carries.

        A histogram ``h`` exposes ``h_bucket`` (with ``le``), ``h_sum`` and ``h_count``; a counter
        ``c`` exposes ``c_total``. Used to check that rules and dashboards query real names.
        """
        out: dict[str, frozenset[str]] = {}
        for metric in vars(self).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            labels = frozenset(metric._labelnames)  # noqa: SLF001 - no public accessor
            for family in metric.describe():
                if family.type == "histogram":
                    out[f"{family.name}_bucket"] = labels | {"le"}
                    out[f"{family.name}_sum"] = labels
                    out[f"{family.name}_count"] = labels
                elif family.type == "counter":
                    out[f"{family.name}_total"] = labels
                else:
                    out[family.name] = labels
        return out

    def init_route(self, route: str) -> None:
        """Create a route's counters at 0 so dashboards show it and increase() sees the first event."""
        for op in ("put", "delete", "tags", "acl"):
            self.events_applied_total.labels(route, op)
        self.bytes_copied_total.labels(route)
        self.conflicts_total.labels(route)


def observe_many(hist: Histogram, values: Sequence[float]) -> None:
    """What `hist.observe(v)` does for each value, with one increment per bucket and one for the
    sum (a batch of thousands of lags costs a few bucket updates, not thousands of locked ones).
    Works on a labelled child (`h.labels(...)`); NaN values are skipped, as observe() counts them
    in no bucket either."""
    bounds = hist._upper_bounds  # noqa: SLF001 - no public bulk API; tests/xdc/test_metrics.py pins it
    counts = [0] * len(bounds)
    total = 0.0
    for v in values:
        if v == v:  # not NaN
            counts[bisect_left(bounds, v)] += 1  # the first bound >= v, as observe()'s `v <= bound`
            total += v
    hist._sum.inc(total)  # noqa: SLF001
    for i, n in enumerate(counts):
        if n:
            hist._buckets[i].inc(n)  # noqa: SLF001


REGISTRY: CollectorRegistry = new_registry()
METRICS: Metrics = Metrics(REGISTRY)
