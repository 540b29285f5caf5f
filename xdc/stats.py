"""Small statistics helpers shared by reports, lag snapshots and benchmarks."""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


class Reservoir:
    """A uniform sample of at most `size` values out of any number (Vitter's algorithm R), with the
    exact count and maximum: percentiles of a long-running loop in bounded memory."""

    def __init__(self, size: int = 100_000, seed: int | None = None) -> None:
        self.size = size
        self.samples: list[float] = []
        self.count = 0
        self.max: float | None = None
        self._rng = random.Random(seed)

    def extend(self, values: Iterable[float]) -> None:
        values = list(values)
        if not values:
            return
        top = max(values)
        self.max = top if self.max is None else max(self.max, top)
        room = self.size - len(self.samples)
        if room > 0:
            self.samples.extend(values[:room])
            self.count += min(room, len(values))
            values = values[room:]
        for v in values:
            self.count += 1
            j = self._rng.randrange(self.count)
            if j < self.size:
                self.samples[j] = v

    def percentile(self, q: float) -> float | None:
        return percentile(self.samples, q)

    def __len__(self) -> int:
        return self.count
