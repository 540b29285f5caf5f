"""Live warm progress: files, bytes, rate and an ETA that learns from the measured rate.

The ETA blends the plan's estimate (bandwidth model learnt from earlier runs) with the rate seen so
far, weighting the observation by the share of work done: early on a few seconds of rate are noisy
(process start, first metadata lookups), near the end the observed rate is the better witness.

Rendered as a tqdm bar on a TTY and as plain log lines otherwise (Airflow task logs); a callback
receives every snapshot (for Prometheus gauges or a DAG's XCom).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from tqdm import tqdm

from cache_client.plan import MIB, Bandwidth, format_seconds

log = logging.getLogger("xdc.prewarm")


@dataclass(frozen=True)
class Snapshot:
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    elapsed: float
    rate_bytes_s: float  # observed
    eta_seconds: float  # blended remaining time
    fraction: float  # share of the modelled work done

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.files_done}/{self.files_total} files, {self.bytes_done / MIB:.1f}/{self.bytes_total / MIB:.1f} MiB "
            f"({self.fraction:.0%}), {self.rate_bytes_s / MIB:.1f} MiB/s, ETA {format_seconds(self.eta_seconds)}"
        )


def blended_eta(planned_remaining: float, elapsed: float, fraction: float) -> float:
    """Remaining seconds: plan's estimate blended with the observed pace, weight = fraction done."""
    if fraction <= 0:
        return planned_remaining
    if fraction >= 1:
        return 0.0
    observed_remaining = elapsed * (1 - fraction) / fraction
    return (1 - fraction) * planned_remaining + fraction * observed_remaining


class Progress:
    """A ProgressSink (see base.py). Thread-safe; cheap to call often."""

    def __init__(
        self,
        bandwidth: Bandwidth | None = None,
        *,
        callback: Callable[[Snapshot], None] | None = None,
        render: Literal["auto", "tqdm", "log", "none"] = "auto",
        log_every_s: float = 5.0,
        desc: str = "prewarm",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bandwidth = bandwidth or Bandwidth()
        self.callback = callback
        self.render = ("tqdm" if sys.stderr.isatty() else "log") if render == "auto" else render
        self.log_every_s = log_every_s
        self.desc = desc
        self.clock = clock
        self._lock = threading.Lock()
        self._files_total = self._bytes_total = self._files = self._bytes = 0
        self._t0 = self._last_log = 0.0
        self._bar: Any = None
        self.history: list[Snapshot] = []  # every snapshot, for benches and reports

    def start(self, files: int, bytes: int) -> None:  # noqa: A002 - protocol name
        with self._lock:
            self._files_total, self._bytes_total = files, bytes
            self._files = self._bytes = 0
            self._t0 = self._last_log = self.clock()
            if self.render == "tqdm":
                self._bar = tqdm(total=bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc)
        self._emit(force=True)

    def add(self, files: int, bytes: int) -> None:  # noqa: A002
        with self._lock:
            self._files = min(self._files_total, self._files + files)
            self._bytes = min(self._bytes_total, self._bytes + bytes)
            if self._bar is not None:
                self._bar.n = self._bytes
        self._emit()

    def finish(self) -> None:
        self._emit(force=True)
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            elapsed = max(0.0, self.clock() - self._t0)
            total_work = self.bandwidth.seconds(self._bytes_total, self._files_total)
            done_work = self.bandwidth.seconds(self._bytes, self._files)
            fraction = 1.0 if total_work <= 0 else min(1.0, done_work / total_work)
            eta = blended_eta(total_work - done_work, elapsed, fraction)
            rate = self._bytes / elapsed if elapsed > 0 else 0.0
            return Snapshot(self._files, self._files_total, self._bytes, self._bytes_total, elapsed, rate, eta, fraction)

    def _emit(self, force: bool = False) -> None:
        snap = self.snapshot()
        self.history.append(snap)
        if self.callback is not None:
            self.callback(snap)
        if self.render == "tqdm" and self._bar is not None:
            self._bar.set_postfix_str(f"{snap.files_done}/{snap.files_total} files, ETA {format_seconds(snap.eta_seconds)}", refresh=True)
        elif self.render == "log":
            now = self.clock()
            if force or now - self._last_log >= self.log_every_s:
                self._last_log = now
                log.info("%s: %s", self.desc, snap.line())
