"""State conformance: every role behaves the same on SQLite and on PostgreSQL (a real server).

Plus what only matters with several writers, on both: the sequencer guard under concurrent upserts,
each outbox row claimed by one publisher, offsets per partition that never move back.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import postgres
from tests.conftest import PG_DATABASE
from xdc.errors import ConfigError, ReplicaRefused, TransientStateError
from xdc.io.state import CatalogEntry, Outgoing, State, open_state
from xdc.io.state.schema import LATEST

ROOT = Path(__file__).resolve().parents[3]


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
    with state.catalog.claim_outbox() as claim:
        return [r.message.value for r in claim.rows]


# -- catalog --------------------------------------------------------------------------------------
def test_migrated_to_the_latest_schema_once(url: str) -> None:
    with open_state(url) as a, open_state(url) as b:  # a second opener finds the schema in place
        assert a.schema_version() == b.schema_version() == LATEST


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


def test_a_duplicate_is_neither_applied_nor_announced_again(state: State) -> None:
    cat = state.catalog
    assert cat.commit_batch([_e("k1", "2"), _e("k2", "1")], _outbox, {}) == [_e("k1", "2"), _e("k2", "1")]
    _drain(state)
    assert cat.commit_batch([_e("k1", "2"), _e("k2", "3")], _outbox, {}) == [_e("k2", "3")]
    assert _drain(state) == [b"k2"]


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
        with state.catalog.claim_outbox() as claim:
            assert len(claim.rows) == 1
            raise RuntimeError("broker away")
    assert _drain(state) == [b"k"]


def test_send_marks_survive_a_failed_publish_and_go_with_the_rows(state: State) -> None:
    cat = state.catalog
    cat.commit_batch([_e(f"k{i}", "1") for i in range(3)], _outbox, {})
    with pytest.raises(RuntimeError):
        with cat.claim_outbox() as claim:
            assert [r.tried for r in claim.rows] == [None] * 3
            first, second = claim.rows[0].id, claim.rows[1].id
            claim.mark_tried({first: (2, 40), second: (0, 7)})
            raise RuntimeError("killed while sending")
    with pytest.raises(RuntimeError):
        with cat.claim_outbox() as claim:
            assert [r.tried for r in claim.rows] == [(2, 40), (0, 7), None]
            claim.mark_tried({first: (2, 90), claim.rows[2].id: (1, 3)})  # an earlier mark is kept
            raise RuntimeError("again")
    with cat.claim_outbox() as claim:
        assert [r.tried for r in claim.rows] == [(2, 40), (0, 7), (1, 3)]
    assert cat.outbox_size() == 0 and not state.db.rows("SELECT id FROM outbox_tries")  # type: ignore[attr-defined]


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


def _keyed(applied: list[CatalogEntry]) -> list[Outgoing]:
    """One row per entry, keyed by the entry's route (as the mirror keys rows by source partition)."""
    return [Outgoing("applied", e.route.encode(), e.key.encode()) for e in applied]


def test_a_key_is_published_by_one_publisher_at_a_time_in_order(url: str) -> None:
    """Rows of one key go to one publisher at a time, oldest first; on PostgreSQL another publisher
    takes the other keys meanwhile (SQLite: one publisher at a time)."""
    with open_state(url) as a, open_state(url) as b:
        a.catalog.commit_batch([_e(f"x{i}", "1", route="p0") for i in range(5)], _keyed, {})
        a.catalog.commit_batch([_e(f"y{i}", "1", route="p1") for i in range(6)], _keyed, {})
        a.catalog.commit_batch([_e("x5", "1", route="p0")], _keyed, {})
        inside, release = threading.Event(), threading.Event()
        first: list[bytes] = []

        def claim_and_hold() -> None:
            with a.catalog.claim_outbox(limit=4) as claim:
                first.extend(r.message.value for r in claim.rows)
                inside.set()
                release.wait(10)

        t = threading.Thread(target=claim_and_hold)
        t.start()
        assert inside.wait(10)
        assert first == [b"x0", b"x1", b"x2", b"x3"]
        ys = [f"y{i}".encode() for i in range(6)]
        if a.supports_replicas:  # the other key goes out meanwhile; p0's rest waits for the first publisher
            assert _drain(b) == ys
            release.set()
            t.join()
            assert _drain(b) == [b"x4", b"x5"]
        else:  # SQLite: the second publisher waits its turn, then takes the rest in queue order
            release.set()
            t.join()
            assert _drain(b) == [b"x4", *ys, b"x5"]
        assert a.catalog.outbox_size() == 0


def test_sqlite_refuses_replicas_postgres_allows_them(state: State) -> None:
    assert state.supports_replicas == (state.backend == "postgres")


_HOLD_LEASE = """
import sys, time
from xdc.io.state import open_state
with open_state(sys.argv[1]) as st, st.lease("mirror"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_mirror_process_is_refused_on_sqlite_until_the_first_dies(url: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LEASE, url], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with open_state(url) as st:
            if st.supports_replicas:
                with st.lease("mirror"):
                    pass  # PostgreSQL: replicas share the state
            else:
                with pytest.raises(ReplicaRefused, match=rf"another mirror process .* \(pid {holder.pid} on .*use a "
                                                         "postgresql:// state_url"):
                    with st.lease("mirror"):
                        pass
                with st.lease("resize"), st.lease("resize"):  # another role; and re-entrant in a process
                    pass
    finally:
        holder.kill()  # SIGKILL: nothing is cleaned up by the holder
        holder.wait(10)
    with open_state(url) as st, st.lease("mirror"):  # the kernel dropped the dead holder's lock
        pass


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
