"""xdc.stats: the nearest-rank percentile and the bounded reservoir (pure)."""
from __future__ import annotations

import random

from xdc.stats import Reservoir, percentile


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile(list(range(1, 101)), 99) == 99


def test_reservoir_keeps_count_and_max_exact_and_memory_bounded() -> None:
    r = Reservoir(size=1000, seed=3)
    rng = random.Random(5)
    values = [rng.random() for _ in range(50_000)]
    for i in range(0, len(values), 777):
        r.extend(values[i:i + 777])
    assert len(r) == 50_000 and r.max == max(values) and len(r.samples) == 1000
    for q in (50, 90, 99):  # a uniform sample of 1000 out of 50,000: within a few percent
        assert abs((r.percentile(q) or 0) - q / 100) < 0.04, q


def test_reservoir_below_its_size_holds_everything() -> None:
    r = Reservoir(size=10)
    r.extend([5.0, 1.0])
    r.extend([])
    assert sorted(r.samples) == [1.0, 5.0] and r.percentile(50) == 1.0 and r.max == 5.0
