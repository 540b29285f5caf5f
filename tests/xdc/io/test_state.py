"""State conformance: every role behaves the same on SQLite and on PostgreSQL (a real server).

Plus what only matters with several writers, on both: the sequencer guard under concurrent upserts,
each outbox row claimed by one publisher, offsets per partition that never move back.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import postgres
from tests.conftest import PG_DATABASE
from xdc.errors import ConfigError, TransientStateError
from xdc.io.state import CatalogEntry, Outgoing, State, open_state, schema, sql
from xdc.io.state.schema import LATEST


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.servers)])
def url(request: pytest.FixtureRequest, tmp_path: Path, tag: str) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    port = request.getfixturevalue("pg_port")
    postgres.create_schema(port, PG_DATABASE, tag)
    return postgres.url(port, PG_DATABASE, schema=tag)


@pytest.fixture
def state(url: str) -> Iterator[State]:
    st = open_state(url)
    try:
        yield st
    finally:
        st.close()


def _e(key: str, seq: str, *, deleted: bool = False, route: str = "r", size: int = 1) -> CatalogEntry:
    return CatalogEntry("b", key, size, "e", seq, deleted, 1.0, 2.0, route, "metadata", "A", "s", key, "e")


def _outbox(applied: list[CatalogEntry]) -> list[Outgoing]:
    return [Outgoing("applied", None, e.key.encode()) for e in applied]


def _drain(state: State) -> list[bytes]:
    with state.catalog.claim_outbox() as rows:
        return [o.value for _, o in rows]


# -- catalog --------------------------------------------------------------------------------------
def test_migrated_to_the_latest_schema_once(url: str) -> None:
    with open_state(url) as a, open_state(url) as b:  # a second opener finds the schema in place
        assert a.schema_version() == b.schema_version() == LATEST


def test_migrations_apply_by_version_whatever_their_order_in_the_tuple(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Branches append their migrations with numbers of their own; a later one may ALTER a table an
    earlier one made, so they run by version (this fails if run in tuple order)."""
    monkeypatch.setattr(sql, "MIGRATIONS", tuple(reversed(schema.MIGRATIONS)))
    with open_state(url) as st:
        assert st.schema_version() == LATEST
        got = {r["version"] for r in st.db.rows("SELECT version FROM schema_migrations")}
    assert got == {m.version for m in schema.MIGRATIONS}


def test_a_database_at_version_1_gets_the_missing_migrations_gaps_and_all(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sql, "MIGRATIONS", tuple(m for m in schema.MIGRATIONS if m.version == 1))
    with open_state(url) as old:
        assert old.schema_version() == 1
    monkeypatch.undo()
    with open_state(url) as st:
        assert st.schema_version() == LATEST
        got = {r["version"] for r in st.db.rows("SELECT version FROM schema_migrations")}
    assert got == {m.version for m in schema.MIGRATIONS}


def test_guard_keeps_newer_rows_and_outbox_only_holds_what_was_applied(state: State) -> None:
    cat = state.catalog
    assert cat.commit_batch([_e("k1", "2")], _outbox, {("g", "t", 0): 5}) == [_e("k1", "2")]
    # another mirror already wrote k1 at sequencer 2: our older k1 must not win, nor be announced
    applied = cat.commit_batch([_e("k1", "1"), _e("k2", "1")], _outbox, {("g", "t", 0): 3})
    assert [e.key for e in applied] == ["k2"]
    assert cat.get("b", "k1").sequencer == "2"  # type: ignore[union-attr]
    assert _drain(state) == [b"k1", b"k2"]
    assert cat.offsets("g") == {("t", 0): 5}  # offsets never move backwards
    assert cat.outbox_size() == 0


def test_tombstone_blocks_an_older_put(state: State) -> None:
    cat = state.catalog
    cat.commit_batch([_e("k", "5", deleted=True)], _outbox, {})
    assert cat.commit_batch([_e("k", "4")], _outbox, {}) == []
    assert cat.get("b", "k").deleted  # type: ignore[union-attr]
    assert cat.live_objects() == []
    assert cat.counts() == {"objects": 0, "bytes": 1, "tombstones": 1}


def test_get_many_counts_totals_and_lags(state: State) -> None:
    cat = state.catalog
    cat.commit_batch([_e("a", "1", size=10), _e("b", "1", size=20, route="q"), _e("c", "2", deleted=True)],
                     _outbox, {})
    got = cat.get_many([("b", "a"), ("b", "b"), ("b", "zz"), ("x", "a")])
    assert sorted(got) == [("b", "a"), ("b", "b")] and got[("b", "b")].size == 20
    assert cat.route_totals() == {"r": {"objects": 1, "bytes": 10, "tombstones": 1},
                                  "q": {"objects": 1, "bytes": 20, "tombstones": 0}}
    assert cat.lags(0.0, "q") == [1.0] and sorted(cat.lags(0.0)) == [1.0, 1.0, 1.0]
    assert cat.lags(3.0) == []


def test_iter_route_streams_in_utf8_byte_order_under_a_prefix(state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("xdc.io.state.sql.PAGE", 3)  # several pages
    keys = ["p/a", "p/b", "p/Z", "p/é", "p/ü", "p/\U0001f600", "p/a/x", "q/a", "p", "pp/x", "p/~"]
    state.catalog.commit_batch([_e(k, "1") for k in keys], _outbox, {})
    state.catalog.commit_batch([_e("p/gone", "1", deleted=True)], _outbox, {})
    got = [e.source_key for e in state.catalog.iter_route("r", "p/")]
    want = sorted((k for k in keys if k.startswith("p/")), key=lambda k: k.encode())
    assert got == want  # S3 lists in UTF-8 byte order: the march relies on the same order
    assert [e.source_key for e in state.catalog.iter_route("r")] == sorted(keys, key=lambda k: k.encode())


def test_offsets_are_per_partition_and_never_move_back(state: State) -> None:
    cat = state.catalog
    cat.commit_batch([], _outbox, {("g", "t", 0): 10, ("g", "t", 1): 4, ("h", "t", 0): 1})
    cat.commit_batch([], _outbox, {("g", "t", 0): 7, ("g", "t", 1): 9})
    assert cat.offsets("g") == {("t", 0): 10, ("t", 1): 9} and cat.offsets("h") == {("t", 0): 1}


def test_a_failed_publish_keeps_the_outbox_rows(state: State) -> None:
    state.catalog.commit_batch([_e("k", "1")], _outbox, {})
    with pytest.raises(RuntimeError):
        with state.catalog.claim_outbox() as rows:
            assert len(rows) == 1
            raise RuntimeError("broker away")
    assert _drain(state) == [b"k"]


# -- several writers --------------------------------------------------------------------------------
def test_sequencer_guard_holds_under_concurrent_upserts(url: str) -> None:
    """Writers racing on the same keys: each key ends at the highest sequencer, and every key is
    announced (outbox) only by writes that held it at their commit."""
    writers = [open_state(url) for _ in range(4)]
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            for round_ in range(15):
                seq = f"{round_ * 4 + w:04d}"
                writers[w].catalog.commit_batch([_e(f"k{i}", seq) for i in range(20)], _outbox, {})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        final = writers[0].catalog.get_many([("b", f"k{i}") for i in range(20)])
        assert {e.sequencer for e in final.values()} == {f"{14 * 4 + 3:04d}"}
        assert writers[0].catalog.outbox_size() > 0
    finally:
        for w in writers:
            w.close()


def test_each_outbox_row_is_claimed_by_one_publisher(url: str) -> None:
    with open_state(url) as a, open_state(url) as b:
        a.catalog.commit_batch([_e(f"k{i}", "1") for i in range(10)], _outbox, {})
        inside, release = threading.Event(), threading.Event()
        first: list[bytes] = []

        def claim_and_hold() -> None:
            with a.catalog.claim_outbox(limit=4) as rows:
                first.extend(o.value for _, o in rows)
                inside.set()
                release.wait(10)

        t = threading.Thread(target=claim_and_hold)
        t.start()
        assert inside.wait(10)
        if a.supports_replicas:  # PostgreSQL: the second publisher skips the locked rows
            with b.catalog.claim_outbox() as rows:
                second = [o.value for _, o in rows]
            release.set()
            t.join()
            assert len(first) == 4 and len(second) == 6 and not set(first) & set(second)
        else:  # SQLite: one writer at a time, the second publisher waits its turn
            release.set()
            t.join()
            second = _drain(b)
            assert len(first) == 4 and len(second) == 6 and not set(first) & set(second)
        assert a.catalog.outbox_size() == 0


def test_sqlite_refuses_replicas_postgres_allows_them(state: State) -> None:
    assert state.supports_replicas == (state.backend == "postgres")


# -- incidents, lag, prewarm --------------------------------------------------------------------
def test_incidents_keep_the_newest_first(state: State) -> None:
    for i in range(3):
        state.incidents.record_dead_letter("t", i, 10 + i, "bad_json", "x" * 5000, 7)
    state.incidents.record_quarantine("b", "k.jpg", "bomb", "too many pixels")
    rows = state.incidents.recent("dead_letters", 2)
    assert [r["part"] for r in rows] == [2, 1] and len(rows[0]["detail"]) == 2000 and rows[0]["offset"] == 12
    assert state.incidents.recent("quarantine")[0]["key"] == "k.jpg"


def test_lag_history_latest_and_retention(state: State) -> None:
    row = {"route": "r", "events": 3, "p50": 0.1, "p99": 0.5, "max": 0.6, "consumer_lag": 2,
           "pending_objects": 1, "pending_bytes": 10}
    state.lag.record([row], retention_s=100, now=1000.0)
    state.lag.record([row | {"route": "q"}, row | {"p99": 0.9}], retention_s=100, now=1050.0)
    assert [(r["route"], r["p99"]) for r in state.lag.latest()] == [("q", 0.5), ("r", 0.9)]
    assert len(state.lag.history(0)) == 3
    state.lag.record([row], retention_s=30, now=1100.0)  # drops the snapshot at 1050 and older
    assert [r["time"] for r in state.lag.history(0)] == [1100.0]


def test_bandwidth_runs_newest_first(state: State) -> None:
    for i in range(7):
        state.prewarm.record_run(10 * (i + 1), i, 1.0)
    state.prewarm.record_run(1, 1, 0.01)  # too short to say anything about bandwidth
    assert [r[0] for r in state.prewarm.runs(5)] == [70, 60, 50, 40, 30]


def test_registrations_and_users(state: State) -> None:
    st = state.prewarm
    assert st.register("ds", "1", (f"b/k{i}" for i in range(12_000)), "s3://m/ds1.txt") == 12_000
    st.register("ds", "2", ["b/k1", "b/new"])
    assert st.users(["b/k1", "b/k5", "b/zzz"]) == {"b/k1": ["ds@1", "ds@2"], "b/k5": ["ds@1"]}
    assert st.users(["b/k1"], exclude=("ds", "1")) == {"b/k1": ["ds@2"]}
    assert st.retire("ds", "2") and not st.retire("ds", "9")
    assert st.users(["b/k1", "b/new"]) == {"b/k1": ["ds@1"]}
    regs = {(r.dataset, r.version): (r.state, r.keys, r.manifest_uri) for r in st.registrations()}
    assert regs == {("ds", "1"): ("active", 12_000, "s3://m/ds1.txt"), ("ds", "2"): ("retired", 2, None)}
    st.register("ds", "2", ["b/k2"])  # re-register: active again with the new keys only
    assert st.users(["b/new", "b/k2"], exclude=("ds", "1")) == {"b/k2": ["ds@2"]}


def test_a_staged_list_is_not_in_use_until_registered(state: State) -> None:
    st = state.prewarm
    assert st.stage("ds", "1", ["b/x", "b/y", "b/x"], "s3://m/l.txt", {"entries": 3, "rejected": [["l3", "bad"]]}) == 2
    assert st.users(["b/x"]) == {}
    assert st.staged("ds", "1") == (["b/x", "b/y"], {"entries": 3, "rejected": [["l3", "bad"]]})
    assert st.staged("ds", "9") is None
    assert st.register("ds", "1") == 2  # the staged keys
    assert st.users(["b/x"]) == {"b/x": ["ds@1"]}
    assert [(r.state, r.manifest_uri) for r in st.registrations()] == [("active", "s3://m/l.txt")]


def test_progress_upsert_keeps_the_check_result(state: State) -> None:
    st = state.prewarm
    st.record_progress("ds", files_done=1, files_total=4, bytes_done=1, bytes_total=4, eta_s=float("inf"),
                       cached_ratio=0.25, ready=False, now=5.0)
    assert st.progress()[0]["eta_s"] is None  # not estimable yet: stored as unknown, not infinity
    st.record_progress("ds", files_done=2, files_total=4, bytes_done=2, bytes_total=4, eta_s=3.0, now=6.0)
    (row,) = st.progress()
    assert (row["files_done"], row["eta_s"], row["cached_ratio"], row["ready"], row["updated"]) == (2, 3.0, 0.25, 0, 6.0)


# -- errors -----------------------------------------------------------------------------------------
def test_unreachable_postgres_is_a_transient_error_without_the_password(pg_port: int) -> None:
    bad = f"postgresql://xdc:s3cret-pw@127.0.0.1:{pg_port + 1}/nope"  # nothing listens there
    with pytest.raises(TransientStateError) as ei:
        open_state(bad)
    assert "s3cret-pw" not in str(ei.value) and "127.0.0.1" in str(ei.value)


def test_bad_url_is_refused() -> None:
    with pytest.raises(ConfigError):
        open_state("mysql://x")


# -- outbox headers, traces, config history, problems (migration 6) -------------------------------
def test_outbox_rows_keep_their_headers(state: State) -> None:
    hdrs = (("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"), ("traceparents", b'{"b/k": "x"}'))
    state.catalog.commit_batch([_e("k1", "1")], lambda ok: [Outgoing("applied", b"p0", b"v", hdrs),
                                                            Outgoing("applied", None, b"w")], {})
    with state.catalog.claim_outbox() as rows:
        assert [o.headers for _, o in rows] == [hdrs, ()]


def _span(trace: str, span: str, key: str | None, start: float, name: str = "mirror.apply",
          parent: str | None = None) -> dict:
    return {"trace_id": trace, "span_id": span, "parent_id": parent, "name": name, "dc": "B", "component": "mirror",
            "key": key, "start_time": start, "end_time": start + 0.5, "status": "ok", "error": "",
            "attributes": {"xdc.route": "camera", "n": 3}, "links": ["t0:s0"]}


def test_traces_by_key_newest_first_anchors_and_retention(state: State) -> None:
    tr = state.traces
    tr.record([_span("t1", "s1", "b/k", 10.0), _span("t1", "s2", None, 10.1, "s3.put", "s1"),
               _span("t2", "s3", "b/k", 20.0, "ingest.object"), _span("t3", "s4", "b/other", 30.0)],
              retention_s=1e9, max_spans=100, now=40.0)
    tr.record([_span("t1", "s1", "b/k", 10.0)], retention_s=1e9, max_spans=100, now=40.0)  # exported twice: kept once
    assert tr.count() == 4
    assert tr.trace_ids(["b/k"]) == ["t2", "t1"]
    got = tr.spans(["t1"])
    assert [s["span_id"] for s in got] == ["s1", "s2"]
    assert got[0]["attributes"] == {"xdc.route": "camera", "n": 3} and got[0]["links"] == ["t0:s0"]
    assert got[1]["parent_id"] == "s1" and got[1]["key"] is None
    assert tr.anchors(["b/k", "b/none"], ["mirror.apply", "ingest.object"]) == {"b/k": ("t2", "s3")}
    assert tr.anchors(["b/k"], ["mirror.apply"]) == {"b/k": ("t1", "s1")}
    assert [r["key"] for r in tr.recent_keys(5)] == ["b/other", "b/k"]
    # the first write of a series trims: spans older than the retention go
    fresh = type(tr)(tr.db)  # type: ignore[call-arg]
    fresh.record([_span("t4", "s5", "b/k", 100.0)], retention_s=50.0, max_spans=100, now=100.0)
    assert sorted(s["span_id"] for s in tr.spans(["t1", "t2", "t3", "t4"])) == ["s5"]


def test_traces_keep_at_most_max_spans(state: State) -> None:
    state.traces.record([_span("t", f"s{i:02d}", "b/k", float(i)) for i in range(30)], retention_s=1e9,
                        max_spans=10, now=100.0)
    assert sorted(s["span_id"] for s in state.traces.spans(["t"])) == [f"s{i:02d}" for i in range(20, 30)]


def test_config_history_versions_processes_and_bodies(state: State) -> None:
    cf = state.configs
    p1 = cf.record_start(config_hash="aa11", body={"v": 1}, component="mirror", host="h1", pid=10, dc="B", now=1.0)
    p2 = cf.record_start(config_hash="aa11", body={"v": "ignored"}, component="resize", host="h2", pid=11, dc="B",
                         now=2.0)
    p3 = cf.record_start(config_hash="bb22", body={"v": 2}, component="mirror", host="h1", pid=12, dc="B", now=3.0)
    cf.heartbeat(p1, now=5.0)
    cf.record_stop(p2, now=6.0)
    assert [(v["hash"], v["processes"], v["open_processes"]) for v in cf.versions()] == [("bb22", 1, 1), ("aa11", 2, 1)]
    assert cf.body("aa") == ("aa11", {"v": 1}) and cf.body("cc") is None
    with pytest.raises(ValueError):
        cf.body("")  # names both
    procs = cf.processes()
    assert [p["id"] for p in procs] == [p3, p2, p1]
    assert procs[1]["stopped_at"] == 6.0 and procs[2]["last_seen"] == 5.0
    assert [p["id"] for p in cf.processes(since=4.0)] == [p2, p1]


def test_problems_add_counts_keep_the_first_example_and_first_seen(state: State) -> None:
    row = {"component": "mirror", "signature": "s1", "level": "WARNING", "logger": "x", "template": "t <n>",
           "first_seen": 10.0, "last_seen": 12.0, "hits": 2, "example": "t 1"}
    assert state.problems.record([row]) == {"s1": 10.0}
    assert state.problems.record([{**row, "first_seen": 20.0, "last_seen": 25.0, "hits": 3, "example": "t 9"},
                                  {**row, "signature": "s2", "first_seen": 30.0, "last_seen": 30.0, "hits": 1}]) \
        == {"s1": 10.0, "s2": 30.0}
    got = state.problems.recent()
    assert [(r["signature"], r["hits"], r["first_seen"], r["last_seen"], r["example"]) for r in got] == \
        [("s2", 1, 30.0, 30.0, "t 1"), ("s1", 5, 10.0, 25.0, "t 1")]
    assert [r["signature"] for r in state.problems.recent(since=15.0)] == ["s2"]
