"""xdc.metrics: names, labels and the helpers, read back from a fresh registry (no server)."""
from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xdc.metrics import LAG_BUCKETS, METRICS, REGISTRY, Metrics, new_registry

# The contract other components, the alert rules and the dashboard rely on.
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "xdc_replication_lag_seconds": ("histogram", {"route", "source_dc", "target_dc"}),
    "xdc_replication_applied_through_timestamp_seconds": ("gauge", {"route", "source_dc", "target_dc"}),
    "xdc_consumer_lag_messages": ("gauge", {"group", "topic", "partition"}),
    "xdc_objects_pending": ("gauge", {"route"}),
    "xdc_bytes_pending": ("gauge", {"route"}),
    "xdc_events_applied": ("counter", {"route", "op"}),
    "xdc_events_failed": ("counter", {"route", "reason"}),
    "xdc_events_ignored": ("counter", {"route", "reason"}),
    "xdc_bytes_copied": ("counter", {"route"}),
    "xdc_dead_letters": ("counter", {"topic", "reason"}),
    "xdc_copies_etag_changed": ("counter", {"route"}),
    "xdc_event_gaps": ("counter", {"topic"}),
    "xdc_event_gap_lost_offsets": ("counter", {"topic"}),
    "xdc_resize_frames": ("counter", {"result"}),
    "xdc_resize_seconds": ("histogram", set()),
    "xdc_resize_bytes_in": ("counter", set()),
    "xdc_resize_bytes_out": ("counter", set()),
    "xdc_prewarm_files_done": ("gauge", {"dataset", "dc"}),
    "xdc_prewarm_files_total": ("gauge", {"dataset", "dc"}),
    "xdc_prewarm_bytes_done": ("gauge", {"dataset", "dc"}),
    "xdc_prewarm_bytes_total": ("gauge", {"dataset", "dc"}),
    "xdc_prewarm_eta_seconds": ("gauge", {"dataset", "dc"}),
    "xdc_prewarm_deadline_timestamp_seconds": ("gauge", {"dataset", "dc"}),
    "xdc_cached_ratio": ("gauge", {"dataset", "dc"}),
    "xdc_dataset_ready": ("gauge", {"dataset", "dc"}),
    "xdc_last_apply_timestamp_seconds": ("gauge", {"route"}),
    "xdc_verify_drift_objects": ("gauge", {"route"}),
    "xdc_conflicts": ("counter", {"route"}),
    "xdc_verify_last_run_timestamp_seconds": ("gauge", {"route"}),
    "xdc_log_problems": ("counter", {"component", "signature"}),
    "xdc_problem_first_seen_timestamp_seconds": ("gauge", {"component", "signature"}),
}


@pytest.fixture
def m() -> Metrics:
    return Metrics(new_registry())


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_every_metric_has_its_type_labels_and_help(m: Metrics) -> None:
    families = {f.name: f for f in m.registry.collect()}
    assert set(families) == set(EXPECTED)
    for name, (kind, labels) in EXPECTED.items():
        fam = families[name]
        assert fam.type == kind, name
        assert len(fam.documentation) > 20, f"{name} needs a clear HELP text"
    series = m.series_labels()
    for name, (kind, labels) in EXPECTED.items():
        key = {"histogram": f"{name}_bucket", "counter": f"{name}_total"}.get(kind, name)
        assert series[key] == labels | ({"le"} if kind == "histogram" else set()), name


def test_fresh_registries_are_independent() -> None:
    a, b = Metrics(new_registry()), Metrics(new_registry())
    a.dead_letters_total.labels("s3-events", "bad_json").inc()
    assert value(a.registry, "xdc_dead_letters_total", topic="s3-events", reason="bad_json") == 1
    assert value(b.registry, "xdc_dead_letters_total", topic="s3-events", reason="bad_json") is None
    # The module default lives on its own registry, not prometheus_client's global one.
    assert METRICS.registry is REGISTRY
    from prometheus_client import REGISTRY as GLOBAL
    assert GLOBAL.get_sample_value("xdc_dead_letters_total", {"topic": "s3-events", "reason": "bad_json"}) is None


def test_lag_buckets_span_10ms_to_1h_with_the_objective() -> None:
    finite = [b for b in LAG_BUCKETS if math.isfinite(b)]
    assert finite[0] == 0.01 and finite[-1] == 3600.0
    assert finite == sorted(finite) and 60.0 in finite


def test_consumer_lag(m: Metrics) -> None:
    m.set_consumer_lag("g", "s3-events", 3, highwater=120, committed=100)
    m.set_consumer_lag("g", "s3-events", 4, highwater=50, committed=None)
    m.set_consumer_lag("g", "s3-events", 5, highwater=10, committed=12)  # committed ahead: never negative
    reg = m.registry
    assert value(reg, "xdc_consumer_lag_messages", group="g", topic="s3-events", partition="3") == 20
    assert value(reg, "xdc_consumer_lag_messages", group="g", topic="s3-events", partition="4") == 50
    assert value(reg, "xdc_consumer_lag_messages", group="g", topic="s3-events", partition="5") == 0


def test_prewarm_snapshot_and_dataset_state(m: Metrics) -> None:
    m.set_prewarm("ds1", "idc-b", files_done=3, files_total=10, bytes_done=300, bytes_total=1000,
                  eta_seconds=None, deadline=None)
    reg, lbl = m.registry, {"dataset": "ds1", "dc": "idc-b"}
    assert value(reg, "xdc_prewarm_eta_seconds", **lbl) == math.inf
    assert value(reg, "xdc_prewarm_deadline_timestamp_seconds", **lbl) == 0
    m.set_prewarm("ds1", "idc-b", files_done=10, files_total=10, bytes_done=1000, bytes_total=1000,
                  eta_seconds=0.0, deadline=1_800_000_000.0)
    assert value(reg, "xdc_prewarm_files_done", **lbl) == 10
    assert value(reg, "xdc_prewarm_bytes_total", **lbl) == 1000
    assert value(reg, "xdc_prewarm_eta_seconds", **lbl) == 0
    assert value(reg, "xdc_prewarm_deadline_timestamp_seconds", **lbl) == 1_800_000_000.0
    m.set_dataset_state("ds1", "idc-b", cached_ratio=1.2, ready=True)
    assert value(reg, "xdc_cached_ratio", **lbl) == 1.0
    assert value(reg, "xdc_dataset_ready", **lbl) == 1
    m.set_dataset_state("ds1", "idc-b", cached_ratio=0.5, ready=False)
    assert value(reg, "xdc_dataset_ready", **lbl) == 0


def test_init_helpers_create_zero_series(m: Metrics) -> None:
    m.init_resize_results()
    m.init_route("r9")
    reg = m.registry
    for result in ("resized", "skipped", "copied", "quarantined"):
        assert value(reg, "xdc_resize_frames_total", result=result) == 0
    assert value(reg, "xdc_events_applied_total", route="r9", op="put") == 0
    assert value(reg, "xdc_bytes_copied_total", route="r9") == 0


def test_exposition_round_trips(m: Metrics) -> None:
    m.resize_seconds.observe(0.04)
    m.resize_bytes_in_total.inc(3_260_000)
    m.resize_bytes_out_total.inc(320_000)
    m.resize_frames_total.labels("resized").inc()
    text = generate_latest(m.registry).decode()
    parsed = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
              or s.name.startswith("xdc_resize_frames")}
    assert parsed["xdc_resize_bytes_in_total"] == 3_260_000
    assert parsed["xdc_resize_bytes_out_total"] == 320_000
    assert parsed["xdc_resize_seconds_count"] == 1
    assert parsed["xdc_resize_frames_total"] == 1


def test_observe_many_equals_observe_per_value() -> None:
    """The bulk observe reaches into prometheus_client's histogram internals: it must count exactly
    what observe() counts, bucket by bucket, including values on a bound, past the last and negative; a NaN
    (which observe() counts in no bucket but adds to the sum) changes nothing."""
    import random

    from xdc.metrics import observe_many

    rng = random.Random(7)
    values = [rng.uniform(0, 4000) for _ in range(500)] + list(LAG_BUCKETS[:-1]) + [0.0, -1.0, 1e9]
    one, many = Metrics(new_registry()), Metrics(new_registry())
    for v in values:
        one.replication_lag_seconds.labels("r", "A", "B").observe(v)
    observe_many(many.replication_lag_seconds.labels("r", "A", "B"), values[:300])
    observe_many(many.replication_lag_seconds.labels("r", "A", "B"), values[300:])
    observe_many(many.replication_lag_seconds.labels("r", "A", "B"), [float("nan")])

    def samples(m: Metrics) -> dict[tuple[str, str], float]:
        out = {}
        for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
            for s in fam.samples:
                if s.name.startswith("xdc_replication_lag_seconds") and not s.name.endswith("_created"):
                    out[(s.name, s.labels.get("le", ""))] = s.value
        return out

    a, b = samples(one), samples(many)
    assert a.keys() == b.keys() and len(a) == len(LAG_BUCKETS) + 2
    assert a.keys() == b.keys()
    for k in a:  # the sum is added in another order: equal up to rounding
        assert math.isclose(a[k], b[k], rel_tol=1e-12) if k[0].endswith("_sum") else a[k] == b[k], k
