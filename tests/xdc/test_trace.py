"""xdc.trace: sampling, parents, W3C traceparent, export rows (pure logic, an in-memory sink)."""
from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest

from xdc import trace
from xdc.config import TracingSettings


class Sink:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.closed = False

    def __call__(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def close(self) -> None:
        self.closed = True

    def named(self, name: str) -> list[dict]:
        return [r for r in self.rows if r["name"] == name]


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    trace.configure(TracingSettings(sample_ratio=1.0, export_interval_ms=10), component="test", dc="A",
                    exporters=[trace.RowExporter(s)])
    try:
        yield s
    finally:
        trace.shutdown()


def test_off_until_configured_and_after_shutdown() -> None:
    trace.shutdown()
    assert not trace.active()
    assert trace.root("x", always=True) is None
    assert trace.child("x", trace.parse_traceparent("00-" + "1" * 32 + "-" + "2" * 16 + "-01")) is None
    assert trace.new_object_headers(None) == []
    with trace.step("s") as s:
        assert s is None


def test_traceparent_round_trip_and_malformed_values() -> None:
    ctx = trace.parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert ctx is not None and ctx.trace_flags.sampled
    assert trace.traceparent(ctx) == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    unsampled = trace.parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
    assert unsampled is not None and not unsampled.trace_flags.sampled
    for bad in ("", "00-xyz-00f067aa0ba902b7-01", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", b"\xff\xfe", "00-abc"):
        assert trace.parse_traceparent(bad) is None
    hdrs = [("other", b"x"), ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]
    assert trace.carried(hdrs) == unsampled
    assert trace.from_headers(hdrs) is None  # not sampled: no step is recorded under it
    assert trace.from_headers(None) is None


def test_ratio_zero_keeps_nothing_but_always_and_unsampled_headers_still_flow() -> None:
    s = Sink()
    trace.configure(TracingSettings(sample_ratio=0.0), component="t", dc="A", exporters=[trace.RowExporter(s)])
    try:
        assert all(trace.root("ingest.object") is None for _ in range(200))
        assert trace.root("release", always=True) is not None
        (name, value), = trace.new_object_headers(None)
        ctx = trace.parse_traceparent(value)
        assert name == "traceparent" and ctx is not None and not ctx.trace_flags.sampled
        # a message that carries an unsampled trace is not sampled again downstream
        assert trace.entry("mirror.apply", [(name, value)]) is None
    finally:
        trace.shutdown()


def test_sampling_ratio_is_about_right() -> None:
    random.seed(7)
    trace.configure(TracingSettings(sample_ratio=0.1), component="t", dc="A", exporters=[trace.RowExporter(Sink())])
    try:
        kept = sum(trace.root("x") is not None for _ in range(5000))
    finally:
        trace.shutdown()
    assert 400 <= kept <= 600, kept  # 10 % of 5000, seed 7


def test_a_chain_across_a_message_keeps_one_trace(sink: Sink) -> None:
    root = trace.root("ingest.object", attributes=trace.attrs(dc="A", key="b/k"))
    assert root is not None
    with trace.use(root), trace.step("s3.put", dc="A") as put:
        assert trace.current() is put
    headers = trace.new_object_headers(root)
    consumed = trace.entry("mirror.apply", headers, attributes=trace.attrs(dc="B", key="b2/k"))
    assert consumed is not None
    trace.record("state.commit", consumed, 100.0, 100.25)
    trace.end(consumed)
    trace.end(root, error=RuntimeError("boom"))
    trace.flush()
    by = {r["name"]: r for r in sink.rows}
    assert len({r["trace_id"] for r in sink.rows}) == 1
    assert by["s3.put"]["parent_id"] == by["ingest.object"]["span_id"]
    assert by["mirror.apply"]["parent_id"] == by["ingest.object"]["span_id"]
    assert by["mirror.apply"]["dc"] == "B" and by["mirror.apply"]["key"] == "b2/k"
    assert by["s3.put"]["dc"] == "A" and by["s3.put"]["component"] == "test"
    assert (by["state.commit"]["start_time"], by["state.commit"]["end_time"]) == (100.0, 100.25)
    assert by["ingest.object"]["status"] == "error" and by["ingest.object"]["attributes"]["xdc.error"] == "RuntimeError"
    assert "xdc.key" not in by["mirror.apply"]["attributes"]  # a column of its own


def test_a_message_with_no_traceparent_starts_a_sampled_root(sink: Sink) -> None:
    s = trace.entry("mirror.apply", [])
    assert s is not None and s.parent is None


def test_a_failing_step_is_marked_and_the_error_goes_on(sink: Sink) -> None:
    root = trace.root("r")
    with pytest.raises(KeyError), trace.use(root), trace.step("s3.transfer"):
        raise KeyError("x")
    trace.end(root)
    trace.flush()
    assert sink.named("s3.transfer")[0]["status"] == "error"


def test_current_span_is_per_thread(sink: Sink) -> None:
    root = trace.root("r")
    seen: list[object] = []
    with trace.use(root):
        t = threading.Thread(target=lambda: seen.append(trace.current()))
        t.start()
        t.join()
        assert trace.current() is root
    assert seen == [None]  # a pool thread is bound explicitly (`use`), never by accident


def test_keyed_headers_carry_each_object(sink: Sink) -> None:
    a, b = trace.root("a"), trace.root("b")
    assert a is not None and b is not None
    hdrs = trace.keyed_headers({"b/x": a.get_span_context(), "b/y": b.get_span_context()})
    ids = lambda c: (c.trace_id, c.span_id)  # noqa: E731 - parsed contexts are "remote"
    assert ids(trace.from_headers(hdrs)) == ids(a.get_span_context())
    assert ids(trace.from_keyed_headers(hdrs, "b/y")) == ids(b.get_span_context())
    assert trace.from_keyed_headers(hdrs, "b/z") is None
    assert trace.keyed_headers({}) == []


def test_a_sink_that_fails_never_breaks_the_traced_work() -> None:
    def broken(rows: list[dict]) -> None:
        raise OSError("disk full")
    trace.configure(TracingSettings(sample_ratio=1.0, export_interval_ms=10), component="t", dc="A",
                    exporters=[trace.RowExporter(broken)])
    try:
        trace.end(trace.root("x"))
        trace.flush()
    finally:
        trace.shutdown()


def test_shutdown_closes_the_sink() -> None:
    s = Sink()
    trace.configure(TracingSettings(sample_ratio=1.0), component="t", dc="A", exporters=[trace.RowExporter(s)])
    trace.end(trace.root("x"))
    trace.shutdown()
    assert s.closed and [r["name"] for r in s.rows] == ["x"]
