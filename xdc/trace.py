"""Tracing: a span per step of an object's path, carried across Kafka in W3C `traceparent` headers.

Every layer creates spans through this module; `configure` (called once per process by the
entry points, `xdc.observe.telemetry`) installs an OpenTelemetry SDK tracer provider with the
exporters of the config: the built-in sink (recent spans in each datacenter's state) and/or OTLP.
Until then, and when tracing is off, every call here is a no-op returning None.

Sampling is decided once, where an object enters (ingest, scan, an S3 event that carries no
trace): `root()` keeps `sample_ratio` of them. Every later step follows that decision: a child of
an unsampled or missing parent is never recorded, so the common path costs a header parse. The
traceparent header is sent for unsampled objects too (flags 00), so that downstream steps do not
sample them again.

Parents are passed explicitly (`parent=`): a `Span`, a `SpanContext` from a header or the state,
or `CURRENT` (the span made current in this thread by `use`). Steps measured elsewhere (a worker
process, a whole batch) are recorded after the fact with explicit start and end times (`record`).
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
)

from xdc.config import TracingSettings

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
# Span attributes with a meaning for `xdc trace` and the dashboard
DC, KEY, COMPONENT, NODE = "xdc.dc", "xdc.key", "xdc.component", "xdc.node"
# Spans that stand for an object arriving in a datacenter: later steps there (prewarm) hang off them
ANCHORS = ("ingest.object", "scan.object", "resize.publish", "mirror.apply")
# The steps of one object's copy, whoever copies it (the sync store, the async copy engine):
# COPY around the whole copy, then reading the source (its headers), moving the bytes, writing
# the target (a PUT, or completing a multipart upload; a streamed copy writes inside TRANSFER).
COPY, SOURCE_READ, TRANSFER, TARGET_WRITE = "mirror.copy", "s3.source_read", "s3.transfer", "s3.target_write"


class _Current:
    def __repr__(self) -> str:
        return "CURRENT"


CURRENT: Any = _Current()  # parent = the span made current in this thread (`use`)
Parent = Span | SpanContext | None


class _Tracing:
    """The process's tracer (one per process; `configure` replaces it)."""

    def __init__(self) -> None:
        self.provider: TracerProvider | None = None
        self.tracer: Any = None
        self.ratio = 0.0
        self.component = ""
        self.dc = ""
        self.settings: TracingSettings | None = None
        self.lock = threading.Lock()


_T = _Tracing()


def configure(settings: TracingSettings, *, component: str, dc: str | None,
              exporters: Sequence[SpanExporter]) -> None:
    """Install the process's tracer provider (replacing a previous one, flushed first).

    `dc`: where this process runs (a span without an `xdc.dc` attribute happened there)."""
    shutdown()
    if not settings.enabled or not exporters:
        return
    resource = Resource.create({"service.name": "xdc-mirror", "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
                                COMPONENT: component, DC: dc or ""})
    # Roots are sampled by `root()` itself (cheaper than a sampler call per unsampled object).
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    for exp in exporters:
        provider.add_span_processor(BatchSpanProcessor(exp, max_queue_size=16384, max_export_batch_size=512,
                                                       schedule_delay_millis=settings.export_interval_ms))
    with _T.lock:
        _T.provider, _T.tracer = provider, provider.get_tracer("xdc")
        _T.ratio, _T.component, _T.dc, _T.settings = settings.sample_ratio, component, dc or "", settings


def shutdown() -> None:
    """Export what is queued and stop (safe to call when not configured)."""
    with _T.lock:
        provider, _T.provider, _T.tracer, _T.settings = _T.provider, None, None, None
    if provider is not None:
        provider.force_flush(10_000)
        provider.shutdown()


def flush(timeout_ms: int = 10_000) -> None:
    provider = _T.provider
    if provider is not None:
        provider.force_flush(timeout_ms)


def active() -> bool:
    return _T.tracer is not None


def settings() -> TracingSettings | None:
    return _T.settings


def here() -> str:
    """The datacenter this process's spans belong to unless they say otherwise."""
    return _T.dc


def component() -> str:
    return _T.component


# -- spans ----------------------------------------------------------------------------------------
def _ns(t: float | None) -> int | None:
    return None if t is None else int(t * 1e9)


def _parent_context(parent: Any) -> SpanContext | None:
    if parent is CURRENT:
        span = otel_trace.get_current_span()
        ctx = span.get_span_context()
    elif isinstance(parent, SpanContext):
        ctx = parent
    elif parent is None:
        return None
    else:
        ctx = parent.get_span_context()
    return ctx if ctx.is_valid and ctx.trace_flags.sampled else None


def root(name: str, *, always: bool = False, attributes: Mapping[str, Any] | None = None,
         start_time: float | None = None, links: Iterable[SpanContext] = ()) -> Span | None:
    """A new trace, kept with probability sample_ratio (`always`: kept, for rare things such as
    releases). None when tracing is off or the trace is not kept."""
    tracer = _T.tracer
    if tracer is None or not (always or (_T.ratio > 0 and random.random() < _T.ratio)):
        return None
    return tracer.start_span(name, context=otel_context.Context(), attributes=attributes,
                             start_time=_ns(start_time), links=[Link(c) for c in links if c.is_valid])


def child(name: str, parent: Any = CURRENT, *, attributes: Mapping[str, Any] | None = None,
          start_time: float | None = None, links: Iterable[SpanContext] = ()) -> Span | None:
    """A step under `parent`; None when the parent is missing or not sampled (nothing recorded)."""
    tracer = _T.tracer
    if tracer is None:
        return None
    ctx = _parent_context(parent)
    if ctx is None:
        return None
    if not attributes or DC not in attributes:  # a step happens where its parent does
        span = otel_trace.get_current_span() if parent is CURRENT else parent
        dc = getattr(span, "attributes", None) and span.attributes.get(DC)
        if dc:
            attributes = {**(attributes or {}), DC: dc}
    return tracer.start_span(name, context=otel_trace.set_span_in_context(NonRecordingSpan(ctx)),
                             attributes=attributes, start_time=_ns(start_time),
                             links=[Link(c) for c in links if c.is_valid])


def end(span: Span | None, *, end_time: float | None = None, error: BaseException | str | None = None,
        attributes: Mapping[str, Any] | None = None) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, str(error)[:300]))
        if isinstance(error, BaseException):
            span.set_attribute("xdc.error", type(error).__name__)
    span.end(end_time=_ns(end_time))


def record(name: str, parent: Any, start: float, end_time: float, *,
           attributes: Mapping[str, Any] | None = None, error: str | None = None,
           links: Iterable[SpanContext] = ()) -> Span | None:
    """A step measured elsewhere, recorded with its own start and end (epoch seconds)."""
    s = child(name, parent, attributes=attributes, start_time=start, links=links)
    end(s, end_time=max(start, end_time), error=error)
    return s


@contextmanager
def step(name: str, parent: Any = CURRENT, **attributes: Any) -> Iterator[Span | None]:
    """`with step("s3.put", key=...)`: a child span around the block, current inside it; an
    exception marks it failed (and goes on)."""
    s = child(name, parent, attributes=_attrs(attributes)) if _T.tracer is not None else None
    if s is None:
        yield None
        return
    token = otel_context.attach(otel_trace.set_span_in_context(s))
    try:
        yield s
    except BaseException as exc:
        end(s, error=exc)
        raise
    else:
        end(s)
    finally:
        otel_context.detach(token)


@contextmanager
def use(span: Span | SpanContext | None) -> Iterator[None]:
    """Make `span` the current parent in this thread for the block (e.g. a copy in a pool thread)."""
    if span is None or not active():
        yield
        return
    s = span if isinstance(span, Span) else NonRecordingSpan(span)
    token = otel_context.attach(otel_trace.set_span_in_context(s))
    try:
        yield
    finally:
        otel_context.detach(token)


def current() -> Span | None:
    """The recording span current in this thread, if any."""
    s = otel_trace.get_current_span()
    return s if s.get_span_context().is_valid and s.is_recording() else None


def _attrs(kw: Mapping[str, Any]) -> dict[str, Any]:
    """key=..., dc=... -> xdc.key, xdc.dc (dotted names pass as they are)."""
    return {(k if "." in k else f"xdc.{k}"): v for k, v in kw.items() if v is not None}


def attrs(*, dc: str | None = None, key: str | None = None, **more: Any) -> dict[str, Any]:
    """Attributes by the project's names: attrs(dc="B", key="b/k", node="b0") -> {"xdc.dc": ...}."""
    return _attrs({"dc": dc, "key": key, **more})


def sampled_context(trace_id: str, span_id: str) -> SpanContext:
    """The context of a span kept in the state (hex ids), as a parent for later steps."""
    return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(1))


def context_of(span: Span | SpanContext | None) -> SpanContext | None:
    if span is None:
        return None
    return span if isinstance(span, SpanContext) else span.get_span_context()


# -- W3C traceparent ------------------------------------------------------------------------------
def traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str | bytes) -> SpanContext | None:
    """A W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>") -> SpanContext; None if malformed."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2 or parts[0] == "ff":
        return None
    try:
        tid, sid, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not tid or not sid:
        return None
    return SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(flags & 1))


def from_headers(headers: Iterable[tuple[str, bytes]] | None) -> SpanContext | None:
    """The sampled trace context of a Kafka message (None: no header, or not sampled)."""
    ctx = carried(headers)
    return ctx if ctx is not None and ctx.trace_flags.sampled else None


def carried(headers: Iterable[tuple[str, bytes]] | None) -> SpanContext | None:
    """The trace context a message carries, sampled or not (None: none)."""
    for k, v in headers or ():
        if k == TRACEPARENT:
            return parse_traceparent(v)
    return None


def headers(span: Span | SpanContext | None) -> list[tuple[str, bytes]]:
    """Kafka headers carrying `span`'s context (empty when there is none)."""
    ctx = context_of(span)
    if ctx is None or not ctx.is_valid:
        return []
    return [(TRACEPARENT, traceparent(ctx).encode())]


def new_object_headers(span: Span | None) -> list[tuple[str, bytes]]:
    """Headers of a message that starts an object's path: its trace if sampled, else an unsampled
    traceparent (so the next step does not sample it again); none when tracing is off."""
    if span is not None:
        return headers(span)
    if not active():
        return []
    ctx = SpanContext(random.getrandbits(128) or 1, random.getrandbits(64) or 1, is_remote=False,
                      trace_flags=TraceFlags(0))
    return [(TRACEPARENT, traceparent(ctx).encode())]


KEYED = "traceparents"  # a message about several objects: {"bucket/key": traceparent} (JSON)


def keyed_headers(contexts: Mapping[str, SpanContext]) -> list[tuple[str, bytes]]:
    """Headers of a message about several objects (an applied message): the first one's as the
    standard traceparent, and each object's under KEYED."""
    if not contexts:
        return []
    first = next(iter(contexts.values()))
    return [(TRACEPARENT, traceparent(first).encode()),
            (KEYED, json.dumps({k: traceparent(c) for k, c in contexts.items()}).encode())]


def from_keyed_headers(headers: Iterable[tuple[str, bytes]] | None, key: str) -> SpanContext | None:
    """The sampled context of one object of a several-object message (see keyed_headers)."""
    for k, v in headers or ():
        if k == KEYED:
            try:
                tp = json.loads(v).get(key)
            except (ValueError, AttributeError):
                return None
            ctx = parse_traceparent(tp) if isinstance(tp, str) else None
            return ctx if ctx is not None and ctx.trace_flags.sampled else None
    return None


def entry(name: str, record_headers: Iterable[tuple[str, bytes]] | None, *,
          attributes: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
          start_time: float | None = None) -> Span | None:
    """The span of a step that consumed a message: a child of the trace it carries, or, for a
    message with no traceparent at all (a bucket's own notification), a new sampled root.

    The common case, a message whose trace is not sampled, is decided from the header's last
    character (the flags) without parsing it; `attributes` may be a function, called only for a
    span that is recorded."""
    if _T.tracer is None:
        return None
    raw = None
    for k, v in record_headers or ():
        if k == TRACEPARENT:
            raw = v
            break
    if raw is not None and raw[-1:] in _UNSAMPLED_FLAG:
        return None
    if raw is None:
        if not (_T.ratio > 0 and random.random() < _T.ratio):
            return None
        return root(name, always=True, attributes=attributes() if callable(attributes) else attributes,
                    start_time=start_time)
    ctx = parse_traceparent(raw)
    if ctx is None or not ctx.trace_flags.sampled:
        return None
    return child(name, ctx, attributes=attributes() if callable(attributes) else attributes, start_time=start_time)


_UNSAMPLED_FLAG = (b"0", b"2", b"4", b"6", b"8", b"a", b"c", b"e", b"A", b"C", b"E")  # flags' low bit clear


# -- export ---------------------------------------------------------------------------------------
def span_row(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain data (what the built-in sink keeps)."""
    ctx = span.context
    attrs_ = dict(span.attributes or {})
    res = span.resource.attributes if span.resource is not None else {}
    parent = span.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None and parent.is_valid else None,
        "name": span.name,
        "dc": str(attrs_.pop(DC, None) or res.get(DC) or ""),
        "component": str(attrs_.pop(COMPONENT, None) or res.get(COMPONENT) or ""),
        "key": attrs_.pop(KEY, None),
        "start_time": (span.start_time or 0) / 1e9, "end_time": (span.end_time or span.start_time or 0) / 1e9,
        "status": "error" if span.status.status_code is StatusCode.ERROR else "ok",
        "error": span.status.description or "",
        "attributes": {k: v if isinstance(v, (str, int, float, bool)) else list(v) for k, v in attrs_.items()},
        "links": [f"{ln.context.trace_id:032x}:{ln.context.span_id:016x}" for ln in span.links],
    }


class RowExporter(SpanExporter):
    """Hands finished spans, as `span_row` dicts, to a sink (the state; never raises into the SDK)."""

    def __init__(self, sink: Callable[[list[dict[str, Any]]], None], *, name: str = "state") -> None:
        self.sink = sink
        self.name = name
        self._warned = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.sink([span_row(s) for s in spans])
            return SpanExportResult.SUCCESS
        except Exception as exc:  # noqa: BLE001 - tracing must never break the traced work
            now = time.monotonic()
            if now - self._warned > 60:
                self._warned = now
                log.warning("spans not kept by the %s sink (%d dropped): %s", self.name, len(spans), exc)
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        close = getattr(self.sink, "close", None)
        if close is not None:
            close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def otlp_exporter(endpoint: str) -> SpanExporter:
    """OTLP over HTTP (protobuf) to a collector: `endpoint` is its base URL (…:4318)."""
    # imported here: protobuf and requests load only in processes that export over OTLP
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = endpoint.rstrip("/")
    return OTLPSpanExporter(endpoint=url if url.endswith("/v1/traces") else url + "/v1/traces", timeout=10)
