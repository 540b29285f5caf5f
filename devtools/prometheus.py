"""A real Prometheus server (Debian's `prometheus`) for tests: scrape some targets, query PromQL.

Started on 127.0.0.1 on a free port with its data in a directory of the caller's; scrapes every
`interval_s` with a bearer token from a file when given (the metrics endpoint's token).
"""
from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from devtools.procs import (
    Proc,
    StackError,
    free_port,
    http_ok,
    spawn,
    stop_proc,
    wait_ready,
)


class Prometheus:
    def __init__(self, proc: Proc, port: int) -> None:
        self.proc, self.port = proc, port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        return self._api("query", params, timeout=10)

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict[str, Any]]:
        """A range query: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s}"}
        return self._api("query_range", params, timeout=30)

    def _api(self, path: str, params: dict[str, str], timeout: float) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}",  # noqa: S310
                                    timeout=timeout) as r:
            doc = json.loads(r.read())
        if doc.get("status") != "success":
            raise StackError(f"prometheus {path} {params['query']!r}: {doc}")
        return list(doc["data"]["result"])

    def value(self, expr: str) -> float | None:
        """The largest value an instant query returns now (None: no series)."""
        got = [float(x["value"][1]) for x in self.query(expr)]
        return max(got) if got else None

    def targets_up(self) -> bool:
        return any(float(x["value"][1]) == 1 for x in self.query("up"))


@contextmanager
def running_prometheus(data_dir: Path, targets: Sequence[str], *, interval_s: float = 1.0,
                       token_file: Path | None = None, job: str = "xdc") -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("no `prometheus` on PATH: install Debian's prometheus (scripts/setup.sh does)")
    data_dir.mkdir(parents=True, exist_ok=True)
    every = f"{round(interval_s * 1000)}ms"  # Prometheus durations take no fractions ("1.0s" is refused)
    scrape: dict[str, Any] = {"job_name": job, "scrape_interval": every,
                              "scrape_timeout": every, "static_configs": [{"targets": list(targets)}]}
    if token_file is not None:
        scrape["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
    cfg = data_dir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({"global": {"scrape_interval": every, "evaluation_interval": every},
                                   "scrape_configs": [scrape]}))
    port = free_port()
    proc = spawn("prometheus", [binary, f"--config.file={cfg}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                 data_dir / "prometheus.log", port=port)
    try:
        wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/-/ready"), "prometheus", proc, timeout=60)
        yield Prometheus(proc, port)
    finally:
        stop_proc(proc)


def wait_for(prom: Prometheus, expr: str, timeout_s: float = 60.0) -> float:
    """Poll until `expr` returns a series; its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = prom.value(expr)
        if v is not None:
            return v
        time.sleep(0.5)
    raise StackError(f"prometheus: no series for {expr!r} after {timeout_s:.0f}s")
