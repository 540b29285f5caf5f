"""State conformance: every role behaves the same on SQLite and on PostgreSQL (a real server).

Plus what only matters with several writers, on both: the sequencer guard under concurrent upserts,
each outbox row claimed by one publisher, offsets per partition that never move back.
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import postgres
from tests.conftest import PG_DATABASE
from xdc.errors import ConfigError, ReplicaRefused, TransientStateError
from xdc.io.state import (
    CatalogEntry,
    MetaChange,
    NodeUsage,
    Outgoing,
    State,
    open_state,
    schema,
    sql,
)
from xdc.io.state.schema import LATEST, MIGRATIONS

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


def _e(key: str, seq: str, *, deleted: bool = False, route: str = "r", size: int = 1, origin: str = "s3",
       etag: str = "e") -> CatalogEntry:
    return CatalogEntry("b", key, size, etag, seq, deleted, 1.0, 2.0, route, "metadata", "A", "s", key, etag,
                        origin=origin)


def _outbox(applied: list[CatalogEntry]) -> list[Outgoing]:
    return [Outgoing("applied", None, e.key.encode()) for e in applied]


def _drain(state: State) -> list[bytes]:
    with state.catalog.claim_outbox() as claim:
        return [r.message.value for r in claim.rows]


# -- catalog --------------------------------------------------------------------------------------
def test_migrated_to_the_latest_schema_once(url: str) -> None:
    with open_state(url) as a, open_state(url) as b:  # a second opener finds the schema in place
        assert a.schema_version() == b.schema_version() == LATEST


def test_a_database_missing_later_migrations_gets_them_in_version_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Versions have gaps (one number reserved per branch): a database made before the later
    migrations gets exactly the missing ones, lowest first, whatever their order in MIGRATIONS."""
    path = tmp_path / "state.db"
    monkeypatch.setattr(sql, "MIGRATIONS", tuple(m for m in MIGRATIONS if m.version == 1))
    open_state(f"sqlite:///{path}").close()  # what migration 1 alone made
    monkeypatch.setattr(sql, "MIGRATIONS", tuple(reversed(MIGRATIONS)))
    later = sorted(m.version for m in MIGRATIONS if m.version > 1)
    with open_state(f"sqlite:///{path}") as st:
        assert st.schema_version() == LATEST
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT version FROM schema_migrations ORDER BY applied_at, version").fetchall()
        assert [v for (v,) in rows] == [1, *later]
        assert db.execute("SELECT COUNT(*) FROM release_ledger").fetchone() == (0,)


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


def test_a_reconciliation_always_applies_and_keeps_the_s3_sequencer(state: State) -> None:
    """S3-shaped sequencers (0055AED6DCD90281E5) and repairs, which carry none (README: Guarantees)."""
    cat = state.catalog
    s3_seq = "0055AED6DCD90281E5".ljust(40, "0")
    cat.commit_batch([_e("k", s3_seq, etag="v1")], _outbox, {})
    # a repair read v2 at the source: it applies although its own sequencer ("") is older ...
    assert cat.commit_batch([_e("k", "", etag="v2", origin="reconcile")], _outbox, {}) != []
    got = cat.get("b", "k")
    assert got is not None and (got.etag, got.origin) == ("v2", "reconcile")
    assert got.sequencer == s3_seq  # ... and the S3 order stays: the greater sequencer is kept
    # a repeated or older S3 event is still stale; a newer one applies
    cat.commit_batch([_e("k", s3_seq, etag="v1")], _outbox, {})  # (the mirror drops it as a duplicate first)
    assert cat.commit_batch([_e("k", "0055AED6DCD90281E0".ljust(40, "0"), etag="v0")], _outbox, {}) == []
    assert cat.get("b", "k").etag == "v2"  # type: ignore[union-attr]
    newer = "0055AED6DCD90281F0".ljust(40, "0")
    assert cat.commit_batch([_e("k", newer, etag="v3")], _outbox, {}) == [_e("k", newer, etag="v3")]
    # a repair of a deleted object turns it into a tombstone without losing the order either
    cat.commit_batch([_e("k", "", deleted=True, etag="", origin="reconcile")], _outbox, {})
    got = cat.get("b", "k")
    assert got is not None and got.deleted and got.sequencer == newer
    assert _drain(state).count(b"k") >= 4  # put, repair, newer put, repaired delete


def test_tag_and_acl_changes_update_live_rows_only(state: State) -> None:
    cat = state.catalog
    cat.commit_batch([_e("live", "1"), _e("gone", "1", deleted=True)], _outbox, {})
    cat.commit_batch([], _outbox, {}, meta=[MetaChange("b", "live", "tags", '{"a":"1"}'),
                                             MetaChange("b", "gone", "tags", '{"a":"1"}'),
                                             MetaChange("b", "nowhere", "acl", "public-read"),
                                             MetaChange("b", "live", "acl", "public-read")])
    live, gone = cat.get("b", "live"), cat.get("b", "gone")
    assert live is not None and (live.tags, live.acl) == ('{"a":"1"}', "public-read")
    assert gone is not None and gone.tags is None
    assert cat.get("b", "nowhere") is None
    cat.commit_batch([_e("live", "2")], _outbox, {})  # a new version replaces the object, tags too
    live = cat.get("b", "live")
    assert live is not None and (live.tags, live.acl) == (None, None)


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
    state.incidents.record_etag_change("b", "big.bin", "a" * 32 + "-3", "c" * 32 + "-2", "rechunked",
                                       "source part layout unknown")
    (row,) = state.incidents.recent("etag_changes")
    assert (row["key"], row["source_etag"], row["etag"], row["layout"]) == ("big.bin", "a" * 32 + "-3",
                                                                             "c" * 32 + "-2", "rechunked")
    assert row["reason"] == "source part layout unknown"


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


def test_retired_oldest_first_and_staged_lists_protect_their_keys(state: State) -> None:
    st = state.prewarm
    for v in ("1", "2", "3"):
        st.register("ds", v, [f"b/{v}", "b/shared"])
    st.stage("next", "1", ["b/3", "b/new"], None, {})
    st.retire("ds", "2")
    st.retire("ds", "1")
    st.retire("ds", "2")  # retiring again keeps the first retirement time
    assert [(r.dataset, r.version, r.keys) for r in st.retired()] == [("ds", "2", 2), ("ds", "1", 2)]
    assert all(r.retired_at is not None for r in st.retired())
    assert st.keys_of("ds", "1") == ["b/1", "b/shared"] and st.keys_of("nope", "1") == []
    assert st.users(["b/1", "b/3", "b/new"]) == {"b/3": ["ds@3"]}
    assert st.users(["b/3", "b/new"], staged=True) == {"b/3": ["ds@3", "next@1"], "b/new": ["next@1"]}


def test_readiness_announces_each_transition_once_through_the_outbox(state: State) -> None:
    st = state.prewarm

    def msg(v: str) -> Outgoing:
        return Outgoing("releases", b"ds", f"ready {v}".encode())

    def check(v: str, ready: bool, now: float) -> bool:
        return st.record_ready("ds", v, ready=ready, files=4, nbytes=40, cached_ratio=1.0 if ready else 0.5,
                               manifest_uri="s3://m/l.txt" if v == "1" else None, now=now, announce=msg(v))

    assert not check("1", False, 1.0)
    assert check("1", True, 2.0)  # became ready: announced
    assert not check("1", True, 3.0)  # still ready: no second announcement
    assert _drain(state) == [b"ready 1"]
    row = state.prewarm.readiness()[0]
    assert (row["ready"], row["ready_at"], row["checked_at"], row["manifest_uri"]) == (True, 2.0, 3.0, "s3://m/l.txt")
    assert not check("1", False, 4.0) and check("1", True, 5.0)  # evicted, then warm again: announced again
    assert check("2", True, 6.0)  # first check of another version, ready at once
    st.register("ds", "1", ["b/x"])
    st.retire("ds", "1")  # retired: no longer offered as ready
    assert [(r["version"], r["ready"]) for r in st.readiness()] == [("1", False), ("2", True)]
    assert _drain(state) == [b"ready 1", b"ready 2"]


def test_node_usage_and_evictions(state: State) -> None:
    st = state.prewarm
    st.record_nodes([NodeUsage("n1", 10, 100, 0.9, 0.7), NodeUsage("n2", 0, 100, 1.0, 1.0)])
    st.record_nodes([NodeUsage("n1", 95, 100, 0.9, 0.7, updated=7.0)])
    assert [(n.node, n.used, n.high_watermark) for n in st.nodes()] == [("n1", 95, 0.9), ("n2", 0, 1.0)]
    assert st.nodes()[0].updated == 7.0
    st.record_eviction("ds", "1", "n1", 3, 300, "room")
    st.record_eviction("ds", "0", "n2", 1, 100, "room")
    assert [(e["version"], e["node"], e["files"], e["bytes"]) for e in st.evictions()] == [("0", "n2", 1, 100),
                                                                                          ("1", "n1", 3, 300)]


def test_a_version_1_database_is_migrated_in_place(url: str) -> None:
    """A state written by the first schema keeps its rows and gains the new tables."""
    first = MIGRATIONS[:1]
    try:
        schema.MIGRATIONS = first
        sql.MIGRATIONS = first  # type: ignore[attr-defined]
        with open_state(url) as old:
            assert old.schema_version() == 1
            old.prewarm.register("ds", "1", ["b/k"])
    finally:
        schema.MIGRATIONS = MIGRATIONS
        sql.MIGRATIONS = MIGRATIONS  # type: ignore[attr-defined]
    with open_state(url) as new:
        assert new.schema_version() == LATEST >= 2
        assert [(r.dataset, r.state, r.keys) for r in new.prewarm.registrations()] == [("ds", "active", 1)]
        new.prewarm.retire("ds", "1")
        assert [(r.dataset, r.state) for r in new.prewarm.retired()] == [("ds", "retired")]
        assert new.prewarm.readiness() == [] and new.prewarm.nodes() == []


# -- errors -----------------------------------------------------------------------------------------
def test_unreachable_postgres_is_a_transient_error_without_the_password(pg_port: int) -> None:
    bad = f"postgresql://xdc:s3cret-pw@127.0.0.1:{pg_port + 1}/nope"  # nothing listens there
    with pytest.raises(TransientStateError) as ei:
        open_state(bad)
    assert "s3cret-pw" not in str(ei.value) and "127.0.0.1" in str(ei.value)


def test_bad_url_is_refused() -> None:
    with pytest.raises(ConfigError):
        open_state("mysql://x")


# -- release ledger -------------------------------------------------------------------------------
def test_release_ledger_keeps_a_result_for_the_same_delivery_and_starts_over_for_a_new_one(state: State) -> None:
    led = state.releases
    doc = {"type": "dataset.released", "dataset": "cams", "version": "v1", "manifest": "s3://b/m.txt"}
    e = led.seen("cams", "v1", doc, "A:rel[0]@7", now=100.0)
    assert (e.state, e.attempts, e.payload, e.first_seen, e.has_result) == ("pending", 0, doc, 100.0, False)
    led.attempt("cams", "v1")
    led.note("cams", "v1", "not_ready: list not mirrored yet")
    led.attempt("cams", "v1")
    again = led.seen("cams", "v1", doc, "A:rel[0]@7", now=101.0)  # the batch redone: tries are kept
    assert (again.state, again.attempts, again.detail) == ("pending", 2, "not_ready: list not mirrored yet")
    led.finish("cams", "v1", "warm", "complete")
    done = led.seen("cams", "v1", doc, "A:rel[0]@7", now=102.0)  # redone after the result: kept
    assert (done.state, done.attempts, done.detail, done.has_result) == ("warm", 2, "complete", True)
    fresh = led.seen("cams", "v1", doc | {"time": "later"}, "A:rel[0]@9", now=103.0)  # published again
    assert (fresh.state, fresh.attempts, fresh.detail, fresh.first_seen) == ("pending", 0, "", 100.0)
    led.seen("other", "v2", doc, "dag", state="not_here", now=104.0)
    assert [x.dataset for x in led.entries()] == ["cams", "other"]
    assert [x.dataset for x in led.entries(["pending"])] == ["cams"]
    assert led.entries([]) == [] and led.get("nope", "v") is None
    assert led.get("other", "v2").state == "not_here"  # type: ignore[union-attr]


# -- outbox headers, traces, config history, problems (migration 6) -------------------------------
def test_outbox_rows_keep_their_headers(state: State) -> None:
    hdrs = (("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"), ("traceparents", b'{"b/k": "x"}'))
    state.catalog.commit_batch([_e("k1", "1")], lambda ok: [Outgoing("applied", b"p0", b"v", hdrs),
                                                            Outgoing("applied", None, b"w")], {})
    with state.catalog.claim_outbox() as claim:
        assert [r.message.headers for r in claim.rows] == [hdrs, ()]


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
