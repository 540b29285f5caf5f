"""What a process sets up to be observed: tracing, problem signatures, its config record.

`start(topology, component)` (the CLI and the Airflow glue call it; tests too):

- tracing (`xdc.trace.configure`) with the config's exporters: the built-in sink writes each span
  into the state of the datacenter it happened in (`StateSpanSink`), OTLP sends to a collector;
- problem signatures (`xdc.problems.ProblemHandler` on the root logger), counted in Prometheus
  and kept in this datacenter's state;
- for a long-running process: its config (hash, masked body), component, host, pid and start
  time in this datacenter's state, with a heartbeat while it runs (the dashboard's process table).

The sinks own a topology of their own (own database connections), so they outlive the caller's.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from xdc import problems, trace
from xdc.config import XdcConfig
from xdc.metrics import METRICS, Metrics
from xdc.observe.configs import config_body, config_hash
from xdc.topology import Topology

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0  # a process not seen for 3 heartbeats is shown as gone


class StateSpanSink:
    """Spans -> the state of the datacenter each happened in (`xdc.dc`, else this process's)."""

    def __init__(self, config: XdcConfig, here: str | None) -> None:
        self.topology = Topology(config, here, durable_state=False)  # spans: no fsync per write
        self.here = here
        self.settings = config.tracing
        self._lock = threading.Lock()

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        by_dc: dict[str, list[dict[str, Any]]] = {}
        known = self.topology.config.datacenters
        for r in rows:
            dc = r.get("dc") or self.here or ""
            if dc not in known:
                dc = self.here or ""
            if not dc:
                continue  # no datacenter to keep it in (a process with no --dc)
            r["dc"] = dc
            by_dc.setdefault(dc, []).append(r)
        with self._lock:  # one exporter thread, but close() may race with it
            for dc, spans in by_dc.items():
                self.topology.site(dc).state.traces.record(
                    spans, retention_s=self.settings.retention_hours * 3600, max_spans=self.settings.max_spans)

    def close(self) -> None:
        with self._lock:
            self.topology.close()


class StateProblemSink:
    """Problem counts -> this datacenter's state; returns the first-seen times kept there."""

    def __init__(self, config: XdcConfig, here: str) -> None:
        self.topology = Topology(config, here, durable_state=False)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Mapping[str, float]:
        return self.topology.here.state.problems.record(rows)

    def close(self) -> None:
        self.topology.close()


class Telemetry:
    """The observation set-up of one process; `close()` flushes and undoes it."""

    def __init__(self, topology: Topology, component: str, *, long_running: bool = False,
                 metrics: Metrics | None = None) -> None:
        cfg = topology.config
        self.component = component
        self.here = topology.here_name
        self.process_id: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._problem_sink: StateProblemSink | None = None
        self._record: Topology | None = None

        exporters: list[Any] = []
        if cfg.tracing.enabled and "state" in cfg.tracing.exporters:
            exporters.append(trace.RowExporter(StateSpanSink(cfg, self.here)))
        if cfg.tracing.enabled and "otlp" in cfg.tracing.exporters and cfg.tracing.otlp_endpoint:
            exporters.append(trace.otlp_exporter(cfg.tracing.otlp_endpoint))
        trace.configure(cfg.tracing, component=component, dc=self.here, exporters=exporters)

        if self.here:
            self._problem_sink = StateProblemSink(cfg, self.here)
        self.problems = problems.install(problems.ProblemHandler(
            component, sink=self._problem_sink, metrics=metrics or METRICS))

        if long_running and self.here:
            self._record = Topology(cfg, self.here)
            self.config_hash = config_hash(cfg)
            self.process_id = self._record.here.state.configs.record_start(
                config_hash=self.config_hash, body=config_body(self._record), component=component,
                host=socket.gethostname(), pid=os.getpid(), dc=self.here)
            self._beat = threading.Thread(target=self._heartbeat, name="xdc-heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        assert self._record is not None and self.process_id is not None
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._record.here.state.configs.heartbeat(self.process_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is not worth stopping for
                log.debug("heartbeat: %s", exc)

    def problem(self, level: int, msg: str, *args: Any) -> None:
        """Count a problem this process reports another way (e.g. the CLI's error line)."""
        self.problems.handle(logging.LogRecord(f"xdc.{self.component}", level, __file__, 0, msg, args, None))

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        trace.shutdown()
        problems.uninstall(self.problems)
        if self._problem_sink is not None:
            self._problem_sink.close()
        if self._record is not None:
            try:
                if self.process_id is not None:
                    self._record.here.state.configs.record_stop(self.process_id)
            finally:
                self._record.close()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(topology: Topology, component: str, *, long_running: bool = False,
          metrics: Metrics | None = None) -> Telemetry:
    return Telemetry(topology, component, long_running=long_running, metrics=metrics)

