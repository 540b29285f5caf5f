"""The resize worker: new frames in the landing datacenter -> 720p derivatives, published as puts.

Its own consumer group on the landing DC's events topic. Per batch: pick put events of frames under
the configured prefixes -> skip those whose derivative already matches the source ETag -> resize in
resident child processes (resize/sandbox.py; each task downloads, resizes and uploads, so frame
bytes never cross processes) -> announce each derivative (a reconciliation; nothing when the store
announces its writes itself) -> quarantine what cannot be resized -> commit offsets.

A child that dies (a native crash in a decoder, the OOM killer) costs exactly the frame it was
working on: that frame is quarantined with reason worker_crashed and the signal in the detail
("SIGSEGV while resizing bucket/key"), the child is replaced, and the rest of the batch goes on.

A replayed batch finds its derivatives done (their xdc-source-etag is the frame's ETag) and writes
nothing again.

A frame whose event carries a sampled trace gets a `resize.frame` span (its download, resize and
upload, timed in the worker process, recorded after the fact) and a `resize.publish` span for the
derivative, whose event carries the trace on: the 720p object's path continues the frame's trace
(when the store announces its writes itself, its event has no traceparent and the mirror starts
the derivative's trace).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resize.frame import derived_key, resize_frame
from resize.sandbox import SandboxPool
from xdc import trace
from xdc.config import ResizeSettings, parse_config
from xdc.errors import EventError, ObjectNotFound, ResizeError, XdcError
from xdc.events import ObjectEvent, encode_notification, message_key, parse_message, reconcile_record
from xdc.faults import crash_point
from xdc.io.consume import Batch, ConsumeLoop, Letter, LoopStats, Source
from xdc.io.deadletter import DeadLetterSink
from xdc.io.kafka import Record, kafka_errors, send_step
from xdc.io.store import META_SOURCE_ETAG
from xdc.metrics import METRICS, Metrics
from xdc.topology import Topology

log = logging.getLogger(__name__)

# The child died on the frame (sandbox.py): quarantined like any bad input.
FRAME_FAULTS = ("worker_crashed", "worker_timeout")
TASK_TIMEOUT_S = 600.0  # a child silent this long (a decoder stuck in a loop) is killed: worker_timeout

META_SOURCE_KEY = "xdc-source-key"


@dataclass(frozen=True)
class Task:
    bucket: str
    key: str
    etag: str
    dst_key: str
    sequencer: str
    event_time: float


@dataclass(frozen=True)
class Outcome:
    task: Task
    result: str  # resized | copied | skipped | done_before | superseded | quarantined
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    etag: str = ""
    reason: str = ""
    detail: str = ""
    timings: tuple[tuple[str, float, float], ...] = ()  # (step, start, end) epoch seconds, for the trace


@dataclass
class ResizeStats:
    frames: int = 0
    results: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    cpu_seconds: float = 0.0
    seconds: float = 0.0
    busy_seconds: float = 0.0  # time spent on batches (not waiting for events)

    def add(self, o: Outcome) -> None:
        self.frames += 1
        self.results[o.result] = self.results.get(o.result, 0) + 1
        self.bytes_in += o.bytes_in
        self.bytes_out += o.bytes_out
        self.cpu_seconds += o.seconds

    def to_dict(self) -> dict[str, Any]:
        done = self.results.get("resized", 0) + self.results.get("copied", 0)
        return {"frames": self.frames, "results": self.results, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "seconds": round(self.seconds, 3),
                "ratio": round(self.bytes_in / self.bytes_out, 2) if self.bytes_out else None,
                "busy_seconds": round(self.busy_seconds, 3),
                "frames_per_s": round(done / self.busy_seconds, 2) if self.busy_seconds else None}


# -- the task, run in a worker process --------------------------------------------------------
_worker_store: Any = None
_worker_settings: ResizeSettings | None = None


def _init_worker(cfg_json: dict[str, Any], base_dir: str, dc: str) -> None:
    global _worker_store, _worker_settings
    cfg = parse_config(cfg_json, base_dir=Path(base_dir), dc=dc)
    _worker_store = Topology(cfg, dc).here.store
    _worker_settings = cfg.resize


def run_task(t: Task) -> Outcome:
    """Download, resize, upload one frame. Never raises for a bad image: it is an Outcome."""
    store, s = _worker_store, _worker_settings
    assert store is not None and s is not None
    t0 = time.process_time()
    w0 = time.time()
    try:
        info, body = store.open(t.bucket, t.key)
        try:
            if t.etag and info.etag != t.etag:
                return Outcome(t, "superseded", detail=f"source ETag {info.etag} != event's {t.etag}")
            if info.size > s.max_input_mib * 2**20:
                raise ResizeError("too_large", f"{info.size} bytes > {s.max_input_mib} MiB")
            data = body.read()
        finally:
            body.close()
    except ObjectNotFound:
        return Outcome(t, "superseded", detail="source object is gone")
    w1 = time.time()
    try:
        out = resize_frame(data, s)
    except ResizeError as exc:
        return Outcome(t, "quarantined", bytes_in=len(data), seconds=time.process_time() - t0,
                       reason=exc.reason, detail=exc.detail)
    if out.data is None:  # already small enough and policy says skip
        return Outcome(t, "skipped", bytes_in=len(data), seconds=time.process_time() - t0)
    w2 = time.time()
    landed = store.put(t.bucket, t.dst_key, out.data,
                       metadata={META_SOURCE_ETAG: info.etag, META_SOURCE_KEY: t.key})
    return Outcome(t, out.action, bytes_in=len(data), bytes_out=len(out.data),
                   seconds=time.process_time() - t0, etag=landed.etag,
                   timings=(("s3.get", w0, w1), ("resize", w1, w2), ("s3.put", w2, time.time())))


# -- the worker -------------------------------------------------------------------------------
class ResizeWorker:
    """Consume-loop handler on the landing datacenter's events topic (the `resize` role's group)."""

    def __init__(self, topology: Topology, *, metrics: Metrics | None = None, group_id: str | None = None,
                 workers: int | None = None) -> None:
        site = topology.resize_site()
        assert topology.config.resize is not None
        self.settings = topology.config.resize
        self.site = site
        self.dc = site.name
        self.metrics = metrics or METRICS
        self.metrics.init_resize_results()
        self.topic = site.topics.events
        self.group_id = group_id or site.group("resize")
        self.store = site.store
        self.incidents = site.state.incidents
        self.producer = site.producer
        self.announce = not site.config.s3.notifications
        self.stats = ResizeStats()
        self.assigned: list[int] = []  # partitions of the events topic this worker holds now
        self._spans: dict[int, Any] = {}  # id(Task) -> its resize.frame span, for one batch
        n = workers or self.settings.workers or os.cpu_count() or 1
        cfg_json = topology.config.model_dump(mode="json", exclude={"base_dir"})
        # Resident spawn children, one task at a time each, so a crash is charged to its frame.
        self.pool = SandboxPool(n, "resize.worker:run_task", initializer="resize.worker:_init_worker",
                                initargs=(cfg_json, str(topology.config.base_dir), self.dc), timeout=TASK_TIMEOUT_S)
        self.max_in_flight = n * 2  # bounds memory: at most this many frames decoded at once
        self.loop = ConsumeLoop(
            [Source(self.dc, site.consumer(self.group_id), self.group_id, (self.topic,))], self,
            name="resize", max_records=200,
            dead_letters=DeadLetterSink(self.producer, site.topics.dead_letter, incidents=self.incidents,
                                        on_letter=lambda t, r: self.metrics.dead_letters_total.labels(t, r).inc()))

    @property
    def alive(self) -> bool:
        return self.loop.alive

    @property
    def caught_up(self) -> bool:
        return self.loop.caught_up

    def close(self) -> None:
        self.pool.close()
        self.loop.close()

    def __enter__(self) -> ResizeWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, *, once: bool = False, max_seconds: float | None = None,
            stop: threading.Event | None = None, join_timeout_s: float = 60.0) -> ResizeStats:
        """Resize new frames until stopped (`once`: until caught up). On a state that takes one
        resize process (SQLite), a second one is refused (ReplicaRefused)."""
        with self.site.state.lease("resize"):
            ls: LoopStats = self.loop.run(once=once, max_seconds=max_seconds, stop=stop,
                                          join_timeout_s=join_timeout_s)
        self.stats.seconds, self.stats.busy_seconds = ls.seconds, ls.busy_seconds
        return self.stats

    def on_assigned(self, source: str, partitions: list[Any], consumer: Any) -> None:
        self.assigned = sorted(tp.partition for tp in partitions)
        log.info("resize in %s: assigned %s", self.dc, ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)))

    def handle(self, batch: Batch) -> list[Letter]:
        letters: list[Letter] = []
        for o, rec in self.process(batch.records):
            self.stats.add(o)
            if o.result == "quarantined":
                letters.append(Letter(rec, f"resize_{o.reason}", f"{o.task.bucket}/{o.task.key}: {o.detail}"))
        return letters

    def tasks(self, records: list[Record]) -> list[tuple[Task, Record]]:
        """Put events of frames under the configured prefixes; everything else is not ours."""
        out = []
        for rec in records:
            try:
                events = parse_message(rec.value)
            except EventError:
                continue  # the mirror dead-letters malformed events; not ours to judge twice
            for ev in events:
                if not isinstance(ev, ObjectEvent) or ev.op != "put" or ev.bucket != self.settings.bucket:
                    continue
                dst = derived_key(ev.key, self.settings)
                if dst is not None:
                    out.append((Task(ev.bucket, ev.key, ev.etag, dst, ev.sequencer, ev.event_time), rec))
        return out

    def process(self, records: list[Record]) -> list[tuple[Outcome, Record]]:
        """Resize the frames of these records; each outcome with the record it came from."""
        todo = []
        outcomes: list[tuple[Outcome, Record]] = []
        self._spans = {}
        for task, rec in self.tasks(records):
            span = trace.entry("resize.frame", rec.headers, attributes=lambda task=task: trace.attrs(
                dc=self.dc, key=f"{task.bucket}/{task.key}", derived_key=f"{task.bucket}/{task.dst_key}"))
            if span is not None:
                self._spans[id(task)] = span
            if self._already_done(task):  # idempotent: a replay writes nothing
                outcomes.append((Outcome(task, "done_before"), rec))
                self._publish(task, None)
                trace.end(span, attributes={"xdc.result": "done_before"})
            else:
                todo.append((task, rec))
        in_flight: list[tuple[Future[Outcome], Task, Record]] = []
        for task, rec in todo:
            in_flight.append((self.pool.submit(task, label=f"{task.bucket}/{task.key}"), task, rec))
            if len(in_flight) >= self.max_in_flight:
                outcomes.append(self._finish(*in_flight.pop(0)))
        while in_flight:
            outcomes.append(self._finish(*in_flight.pop(0)))
        with kafka_errors("flush resize events"):
            self.producer.flush(timeout=60)
        crash_point("resize.after_publish")  # derivative events out; offsets not committed
        return outcomes

    def _already_done(self, t: Task) -> bool:
        try:
            meta = self.store.head(t.bucket, t.dst_key).metadata
        except ObjectNotFound:
            return False
        return bool(t.etag) and meta.get(META_SOURCE_ETAG) == t.etag

    def _finish(self, fut: Future[Outcome], task: Task, rec: Record) -> tuple[Outcome, Record]:
        try:
            o = fut.result()
        except ResizeError as exc:
            if exc.reason not in FRAME_FAULTS:
                raise
            o = Outcome(task, "quarantined", reason=exc.reason, detail=exc.detail)
        except XdcError:
            # S3 trouble, or a child that cannot start: not the frame's fault, so the batch is
            # retried, not quarantined
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in the task must not stop the batch
            o = Outcome(task, "quarantined", reason="unexpected_error", detail=repr(exc)[:300])
        span = self._spans.get(id(task))
        for name, t0, t1 in o.timings:
            trace.record(name, span, t0, t1, attributes=trace.attrs(dc=self.dc))
        m = self.metrics
        if o.result in ("resized", "copied"):
            crash_point("resize.after_upload")  # the derivative is in the store, its event not yet sent
            self._publish(task, o)  # the task of this process: its span is keyed by it
            m.resize_bytes_in_total.inc(o.bytes_in)
            m.resize_bytes_out_total.inc(o.bytes_out)
            m.resize_seconds.observe(o.seconds)
            m.resize_frames_total.labels(o.result).inc()
        elif o.result == "skipped":
            m.resize_frames_total.labels("skipped").inc()
        elif o.result == "quarantined":  # the loop sends the record to the dead-letter topic
            log.warning("quarantine %s/%s: %s %s", o.task.bucket, o.task.key, o.reason, o.detail)
            self.incidents.record_quarantine(o.task.bucket, o.task.key, o.reason, o.detail)
            m.resize_frames_total.labels("quarantined").inc()
        trace.end(span, attributes={"xdc.result": o.result, "xdc.bytes_in": o.bytes_in, "xdc.bytes_out": o.bytes_out},
                  error=f"{o.reason}: {o.detail}" if o.result == "quarantined" else None)
        return o, rec

    def _publish(self, t: Task, o: Outcome | None) -> None:
        """Announce a derivative, unless the store announces its writes itself (then it did already;
        a second event would copy the derivative twice)."""
        if self.announce is False:
            return
        if o is None:
            info = self.store.head(t.bucket, t.dst_key)
            size, etag = info.size, info.etag
        else:
            size, etag = o.bytes_out, o.etag
        t_event = time.time()
        rec = reconcile_record("put", t.bucket, t.dst_key, size=size, etag=etag, event_time=t_event,
                               region=self.site.config.s3.region)
        key = f"{t.bucket}/{t.dst_key}"
        span = trace.child("resize.publish", self._spans.get(id(t)),
                           attributes=trace.attrs(dc=self.dc, key=key, event_time=t_event, source_key=f"{t.bucket}/{t.key}"))
        with kafka_errors("publish derivative event"):
            send_step(self.producer, self.topic, key=message_key(t.bucket, t.dst_key), value=encode_notification([rec]),
                      parent=span, starts_object=True, attributes=trace.attrs(dc=self.dc, key=key))
        trace.end(span)
