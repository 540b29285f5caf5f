"""Prewarm state in SQLite: bandwidth estimates and dataset registrations."""
from __future__ import annotations

from pathlib import Path

import pytest

from cache_client.plan import MIB
from cache_client.state import PrewarmState, estimate_bandwidth


def test_default_then_median_then_fit(tmp_path: Path) -> None:
    st = PrewarmState(tmp_path / "catalog.db")
    assert st.bandwidth("a", 50).source == "default" and st.bandwidth("a", 50).bytes_per_s == 50 * MIB
    st.record_run("a", 100 * MIB, 0, 1.0)
    st.record_run("a", 100 * MIB, 0, 4.0)
    st.record_run("b", 1, 1, 100.0)  # other DC: ignored
    assert st.bandwidth("a", 50).bytes_per_s == pytest.approx(62.5 * MIB)  # median of 100 and 25 MiB/s
    # bandwidth 100 MiB/s, 0.01 s per file, three different mixes: the fit recovers both
    runs = [(b, f, b / (100 * MIB) + f * 0.01) for b, f in [(100 * MIB, 10), (10 * MIB, 1000), (50 * MIB, 200)]]
    bw = estimate_bandwidth(runs, 1.0)
    assert bw.bytes_per_s == pytest.approx(100 * MIB) and bw.per_file_s == pytest.approx(0.01)
    assert bw.source == "measured (3 runs)"


def test_only_recent_runs_count(tmp_path: Path) -> None:
    st = PrewarmState(tmp_path / "c.db")
    for _ in range(5):
        st.record_run("a", 10 * MIB, 10, 1.0)
    for _ in range(5):
        st.record_run("a", 20 * MIB, 20, 1.0)
    assert len(st.runs("a")) == 5 and {r[0] for r in st.runs("a")} == {20 * MIB}


def test_registrations_and_users(tmp_path: Path) -> None:
    st = PrewarmState(tmp_path / "c.db")
    assert st.register("ds", "1", "a", (f"b/k{i}" for i in range(12_000)), "s3://m/ds1.txt") == 12_000
    st.register("ds", "2", "a", ["b/k1", "b/new"])
    st.register("other", "1", "b", ["b/k1"])  # other DC does not count
    assert st.users("a", ["b/k1", "b/k5", "b/zzz"]) == {"b/k1": ["ds@1", "ds@2"], "b/k5": ["ds@1"]}
    assert st.users("a", ["b/k1"], exclude=("ds", "1")) == {"b/k1": ["ds@2"]}
    assert st.retire("ds", "2", "a") and not st.retire("ds", "9", "a")
    assert st.users("a", ["b/k1", "b/new"]) == {"b/k1": ["ds@1"]}
    regs = {(r.dataset, r.version, r.dc): (r.state, r.keys) for r in st.registrations()}
    assert regs == {("ds", "1", "a"): ("active", 12_000), ("ds", "2", "a"): ("retired", 2), ("other", "1", "b"): ("active", 1)}
    st.register("ds", "2", "a", ["b/k2"])  # re-register: active again with the new keys only
    assert st.users("a", ["b/new", "b/k2"], exclude=("ds", "1")) == {"b/k2": ["ds@2"]}
