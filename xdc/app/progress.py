"""Progress for long CLI work: a tqdm bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def counter(what: str, unit: str = "item", every_s: float = 5.0) -> Iterator[Callable[[int, int], None]]:
    """Yields update(done, total)."""
    if sys.stderr.isatty():
        bar = tqdm(desc=what, unit=unit, file=sys.stderr)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        try:
            yield update
        finally:
            bar.close()
        return
    last = [0.0]

    def plain(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            print(f"{what}: {done}/{total} {unit}s", file=sys.stderr, flush=True)
    yield plain
