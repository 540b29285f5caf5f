"""Long-running processes expose /metrics, /healthz and /readyz when config.metrics.port is set."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from xdc.config import XdcConfig
from xdc.observe.http import ServerHandle, serve


@contextmanager
def serving(cfg: XdcConfig, *, live: Callable[[], bool], ready: Callable[[], bool]) -> Iterator[ServerHandle | None]:
    if not cfg.metrics.port:
        yield None
        return
    handle = serve(cfg.metrics.host, cfg.metrics.port, live=live, ready=ready, token=cfg.metrics.token())
    try:
        yield handle
    finally:
        handle.stop()
