"""The state roles written once in SQL, over a small database adapter (`Db`) per backend.

SQL here uses `?` placeholders; the PostgreSQL adapter turns them into `%s`. Where the dialects
differ (the batch upsert, claiming outbox rows, bulk loads) a backend overrides one method.
"""
from __future__ import annotations

import json
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import islice
from typing import Any, Protocol

from xdc.io.state.base import (
    CatalogEntry,
    ConfigHistory,
    Conflict,
    Gap,
    IncidentKind,
    Incidents,
    LagHistory,
    LedgerEntry,
    LedgerState,
    MetaChange,
    NodeUsage,
    ObjectCatalog,
    Offsets,
    Outgoing,
    OutboxClaim,
    OutboxRow,
    PrewarmRecords,
    ProblemLog,
    Registration,
    ReleaseLedger,
    VerifyHistory,
    Traces,
)
from xdc.io.state.schema import MIGRATIONS

CHUNK = 5000  # rows per executemany / IN (...) chunk
PAGE = 5000  # rows per page when streaming a route
DETAIL_MAX = 2000

OBJECT_COLUMNS = ("bucket", "key", "size", "etag", "sequencer", "deleted", "event_time", "applied_time",
                  "route", "mode", "source_dc", "source_bucket", "source_key", "source_etag", "origin", "tags", "acl")


class Tx(Protocol):
    """A transaction: every statement commits together, or none does."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...


class Db(ABC):
    """A database as the roles need it: reads, transactions, a schema lock. Errors are translated
    into StateError / TransientStateError here, once."""

    dialect: str
    greatest: str  # the two-argument maximum function
    least: str  # and minimum

    @abstractmethod
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]: ...

    @abstractmethod
    def lock_schema(self, tx: Tx) -> None:
        """Serialise schema changes between processes for the rest of `tx`."""

    @abstractmethod
    def close(self) -> None: ...

    def copy_rows(self, tx: Tx, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Bulk insert (a backend may use a faster path than executemany)."""
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) ON CONFLICT DO NOTHING"
        n = 0
        it = iter(rows)
        while chunk := list(islice(it, CHUNK)):
            tx.executemany(sql, chunk)
            n += len(chunk)
        return n

    def migrate(self) -> int:
        """Apply the migrations this database lacks, in order; returns the schema version."""
        with self.transaction() as tx:
            self.lock_schema(tx)
            tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                       "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            done = {r["version"] for r in tx.rows("SELECT version FROM schema_migrations")}
            for m in sorted(MIGRATIONS, key=lambda m: m.version):
                if m.version in done:
                    continue
                for stmt in m.statements(self.dialect):
                    tx.execute(stmt)
                tx.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                           (m.version, m.name, time.time()))
        return self.version()

    def version(self) -> int:
        got = self.rows("SELECT MAX(version) AS v FROM schema_migrations")
        return int(got[0]["v"] or 0) if got else 0


class ThreadConnections:
    """One connection per thread (SQLite and psycopg connections are not shared across threads).
    Connections of threads that ended are closed when a new one is opened; `close()` closes all."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, Any]] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                dead = [(t, c) for t, c in self._all if not t.is_alive()]
                self._all = [(t, c) for t, c in self._all if t.is_alive()]
                self._all.append((threading.current_thread(), conn))
            for _, c in dead:  # e.g. a request thread of the dashboard's HTTP server
                _close_quietly(c)
        return conn

    def drop(self) -> None:
        """Forget this thread's connection (after it broke); the next call reconnects."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                self._all = [(t, c) for t, c in self._all if c is not conn]
            _close_quietly(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for _, c in conns:
            _close_quietly(c)
        self._local = threading.local()


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing is best effort (it may be broken already)
        pass


# -- catalog ------------------------------------------------------------------------------------
def entry_of(r: Mapping[str, Any]) -> CatalogEntry:
    return CatalogEntry(r["bucket"], r["key"], int(r["size"]), r["etag"], r["sequencer"], bool(r["deleted"]),
                        float(r["event_time"]), float(r["applied_time"]), r["route"], r["mode"], r["source_dc"],
                        r["source_bucket"], r["source_key"], r["source_etag"], r["origin"], r["tags"], r["acl"])


def row_of(e: CatalogEntry) -> tuple[Any, ...]:
    return (e.bucket, e.key, e.size, e.etag, e.sequencer, int(e.deleted), e.event_time, e.applied_time,
            e.route, e.mode, e.source_dc, e.source_bucket, e.source_key, e.source_etag, e.origin, e.tags, e.acl)


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (None: no bound)."""
    p = prefix
    while p:
        last = ord(p[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # skip surrogates: not valid in UTF-8 text
                nxt = 0xE000
            return p[:-1] + chr(nxt)
        p = p[:-1]
    return None


INSERT_OBJECTS = f"INSERT INTO objects ({', '.join(OBJECT_COLUMNS)})"
# the guard that makes apply idempotent and ordered per key, even with several writers
IF_NEWER = ("ON CONFLICT (bucket, key) DO UPDATE SET "
            + ", ".join(f"{c}=excluded.{c}" for c in OBJECT_COLUMNS[2:])
            + " WHERE excluded.sequencer > objects.sequencer")


def if_reconciled(greatest: str) -> str:
    """The upsert of a reconciliation: always applied (it read the source's current state), keeping
    the greater sequencer so that later S3 events of the key are still ordered against S3's own."""
    return ("ON CONFLICT (bucket, key) DO UPDATE SET "
            + ", ".join(f"{c}=excluded.{c}" for c in OBJECT_COLUMNS[2:] if c != "sequencer")
            + f", sequencer={greatest}(objects.sequencer, excluded.sequencer)")


class SqlClaim(OutboxClaim):
    def __init__(self, db: Db, rows: list[OutboxRow]) -> None:
        self.db = db
        self.rows = rows

    def mark_tried(self, where: Mapping[int, tuple[int, int]]) -> None:
        if where:
            with self.db.transaction() as tx:  # committed before anything is sent
                tx.executemany("INSERT INTO outbox_tries (id, part, from_offset) VALUES (?, ?, ?) "
                               "ON CONFLICT (id) DO NOTHING", [(i, p, o) for i, (p, o) in where.items()])


def outbox_row(r: Mapping[str, Any]) -> OutboxRow:
    tried = None if r["part"] is None else (int(r["part"]), int(r["from_offset"]))
    return OutboxRow(int(r["id"]), Outgoing(r["topic"], _bytes(r["key"]), _bytes(r["value"]) or b"",
                                            _unpack_headers(_bytes(r["headers"]))), tried)


# an outbox row with its send mark; a backend may add columns between the two
OUTBOX_COLUMNS = "SELECT o.id, o.topic, o.key, o.value, o.headers, t.part, t.from_offset"
OUTBOX_FROM = "FROM outbox o LEFT JOIN outbox_tries t ON t.id = o.id"


class SqlCatalog(ObjectCatalog):
    def __init__(self, db: Db, *, publisher: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        self.db = db
        self._publisher = publisher  # held while claimed rows are published: one publisher at a time

    def get_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], CatalogEntry]:
        out: dict[tuple[str, str], CatalogEntry] = {}
        wanted = list(dict.fromkeys(keys))
        for i in range(0, len(wanted), 400):
            chunk = wanted[i:i + 400]
            where = " OR ".join(["(bucket=? AND key=?)"] * len(chunk))
            for r in self.db.rows(f"SELECT * FROM objects WHERE {where}", [x for bk in chunk for x in bk]):
                e = entry_of(r)
                out[(e.bucket, e.key)] = e
        return out

    def commit_batch(self, entries: Sequence[CatalogEntry],
                     outbox: Callable[[list[CatalogEntry]], Sequence[Outgoing]],
                     offsets: Offsets, meta: Sequence[MetaChange] = ()) -> list[CatalogEntry]:
        entries = _newest_per_key(entries)
        ordered = [e for e in entries if e.origin != "reconcile"]
        reconciled = [e for e in entries if e.origin == "reconcile"]
        with self.db.transaction() as tx:
            applied = self._upsert(tx, ordered) + self._upsert(tx, reconciled, always=True)
            for m in meta:  # after the content: a put of this batch resets the tags it replaces
                tx.execute(f"UPDATE objects SET {m.kind}=? WHERE bucket=? AND key=? AND deleted=0",
                           (m.value, m.bucket, m.key))
            tx.executemany("INSERT INTO outbox (topic, key, value, headers) VALUES (?, ?, ?, ?)",
                           [(o.topic, o.key, o.value, _pack_headers(o.headers)) for o in outbox(applied)])
            tx.executemany(
                "INSERT INTO offsets (grp, topic, part, next_offset) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (grp, topic, part) DO UPDATE SET "
                f"next_offset={self.db.greatest}(offsets.next_offset, excluded.next_offset)",
                [(g, t, p, o) for (g, t, p), o in offsets.items()])
        return applied

    def _upsert(self, tx: Tx, entries: list[CatalogEntry], always: bool = False) -> list[CatalogEntry]:
        """Upsert where newer (`always`: a reconciliation, applied whatever the stored sequencer);
        returns the entries applied. Here (SQLite) the transaction holds the database's one write
        lock, so the sequencers read inside it decide exactly which entries win; a backend with
        several writers decides in the statement itself (PostgreSQL)."""
        if not entries:
            return []
        if always:
            tx.executemany(f"{INSERT_OBJECTS} VALUES ({', '.join('?' * len(OBJECT_COLUMNS))}) "
                           f"{if_reconciled(self.db.greatest)}", [row_of(e) for e in entries])
            return list(entries)
        held: dict[tuple[str, str], str] = {}
        for i in range(0, len(entries), 400):
            chunk = entries[i:i + 400]
            where = " OR ".join(["(bucket=? AND key=?)"] * len(chunk))
            for r in tx.rows(f"SELECT bucket, key, sequencer FROM objects WHERE {where}",
                             [x for e in chunk for x in (e.bucket, e.key)]):
                held[(r["bucket"], r["key"])] = r["sequencer"]
        newer = [e for e in entries if (e.bucket, e.key) not in held or e.sequencer > held[(e.bucket, e.key)]]
        tx.executemany(f"{INSERT_OBJECTS} VALUES ({', '.join('?' * len(OBJECT_COLUMNS))}) {IF_NEWER}",
                       [row_of(e) for e in newer])
        return newer

    @contextmanager
    def claim_outbox(self, limit: int = 10_000) -> Iterator[OutboxClaim]:
        if not self.db.rows("SELECT 1 AS x FROM outbox LIMIT 1"):  # the common case: no lock taken
            yield SqlClaim(self.db, [])
            return
        with self._publisher():  # no transaction stays open while the rows are published
            rows = [outbox_row(r) for r in self.db.rows(f"{OUTBOX_COLUMNS} {OUTBOX_FROM} ORDER BY o.id LIMIT ?",
                                                        (limit,))]
            yield SqlClaim(self.db, rows)
            self._delete_outbox([r.id for r in rows])

    def _delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget published rows and their marks."""
        with self.db.transaction() as tx:
            for i in range(0, len(ids), 500):
                chunk = list(ids[i:i + 500])
                marks = ",".join("?" * len(chunk))
                tx.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
                tx.execute(f"DELETE FROM outbox_tries WHERE id IN ({marks})", chunk)

    def outbox_size(self) -> int:
        return int(self.db.rows("SELECT COUNT(*) AS n FROM outbox")[0]["n"])

    def iter_route(self, route: str, prefix: str = "") -> Iterator[CatalogEntry]:
        end = prefix_end(prefix)
        after: str | None = None
        while True:
            sql = "SELECT * FROM objects WHERE route=? AND deleted=0 AND source_key >= ?"
            params: list[Any] = [route, prefix]
            if end is not None:
                sql += " AND source_key < ?"
                params.append(end)
            if after is not None:
                sql += " AND source_key > ?"
                params.append(after)
            page = self.db.rows(sql + " ORDER BY source_key LIMIT ?", [*params, PAGE])
            for r in page:
                yield entry_of(r)
            if len(page) < PAGE:
                return
            after = page[-1]["source_key"]

    def live_objects(self, bucket: str | None = None) -> list[CatalogEntry]:
        sql, params = "SELECT * FROM objects WHERE deleted=0", []
        if bucket:
            sql += " AND bucket=?"
            params.append(bucket)
        return [entry_of(r) for r in self.db.rows(sql + " ORDER BY bucket, key", params)]

    def offsets(self, group: str) -> dict[tuple[str, int], int]:
        rows = self.db.rows("SELECT topic, part, next_offset FROM offsets WHERE grp=?", (group,))
        return {(r["topic"], int(r["part"])): int(r["next_offset"]) for r in rows}

    def counts(self) -> dict[str, int]:
        r = self.db.rows("SELECT COUNT(*) AS n, CAST(COALESCE(SUM(size), 0) AS BIGINT) AS b, "
                         "CAST(COALESCE(SUM(deleted), 0) AS BIGINT) AS d FROM objects")[0]
        return {"objects": int(r["n"]) - int(r["d"]), "bytes": int(r["b"]), "tombstones": int(r["d"])}

    def route_totals(self) -> dict[str, dict[str, int]]:
        rows = self.db.rows(
            "SELECT route, CAST(COUNT(*) - SUM(deleted) AS BIGINT) AS n, "
            "CAST(COALESCE(SUM(CASE WHEN deleted=0 THEN size END), 0) AS BIGINT) AS b, "
            "CAST(SUM(deleted) AS BIGINT) AS d FROM objects GROUP BY route")
        return {r["route"]: {"objects": int(r["n"]), "bytes": int(r["b"]), "tombstones": int(r["d"])} for r in rows}

    def lags(self, since: float, route: str | None = None) -> list[float]:
        sql = "SELECT applied_time - event_time AS lag FROM objects WHERE applied_time >= ?"
        params: list[Any] = [since]
        if route:
            sql += " AND route=?"
            params.append(route)
        return [float(r["lag"]) for r in self.db.rows(sql, params)]


def _registration(r: Mapping[str, Any]) -> Registration:
    retired = r.get("retired_at")
    return Registration(r["dataset"], r["version"], r["state"], r["manifest_uri"], int(r["n"]),
                        None if retired is None else float(retired))


def _newest_per_key(entries: Sequence[CatalogEntry]) -> list[CatalogEntry]:
    """One entry per key (the newest): a single statement may touch a row once."""
    best: dict[tuple[str, str], CatalogEntry] = {}
    for e in entries:
        cur = best.get((e.bucket, e.key))
        if cur is None or e.sequencer > cur.sequencer:
            best[(e.bucket, e.key)] = e
    return list(best.values()) if len(best) != len(entries) else list(entries)


def _finite(v: float | None) -> float | None:
    """None for a value that is not a finite number (an ETA that cannot be estimated yet)."""
    return None if v is None or not math.isfinite(v) else max(0.0, v)


def _bytes(v: Any) -> bytes | None:
    return None if v is None else bytes(v)


def _pack_headers(headers: Sequence[tuple[str, bytes]]) -> bytes | None:
    return json.dumps([[k, v.decode("latin-1")] for k, v in headers]).encode() if headers else None


def _unpack_headers(raw: bytes | None) -> tuple[tuple[str, bytes], ...]:
    return tuple((k, v.encode("latin-1")) for k, v in json.loads(raw)) if raw else ()


# -- incidents, lag -----------------------------------------------------------------------------
class SqlIncidents(Incidents):
    def __init__(self, db: Db) -> None:
        self.db = db

    def record_dead_letter(self, topic: str, partition: int | None, offset: int | None, reason: str,
                           detail: str, size: int) -> None:
        with self.db.transaction() as tx:
            tx.execute('INSERT INTO dead_letters (time, topic, part, "offset", reason, detail, size) '
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (time.time(), topic, partition, offset, reason, detail[:DETAIL_MAX], size))

    def record_quarantine(self, bucket: str, key: str, reason: str, detail: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO quarantine (time, bucket, key, reason, detail) VALUES (?, ?, ?, ?, ?)",
                       (time.time(), bucket, key, reason, detail[:DETAIL_MAX]))

    def record_gap(self, gap: Gap) -> bool:
        with self.db.transaction() as tx:
            same = tx.rows("SELECT committed FROM gaps WHERE grp = ? AND topic = ? AND part = ? "
                           "AND status = 'pending'", (gap.group, gap.topic, gap.partition))
            if any(row["committed"] == gap.committed for row in same):
                return False
            tx.execute("INSERT INTO gaps (time, grp, topic, part, committed, log_start, lost, routes, repair, status) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                       (time.time(), gap.group, gap.topic, gap.partition, gap.committed, gap.log_start, gap.lost,
                        ",".join(gap.routes), gap.repair[:DETAIL_MAX]))
            return True

    def open_gaps(self, group: str) -> list[dict[str, Any]]:
        return self.db.rows("SELECT * FROM gaps WHERE grp = ? AND status = 'pending' ORDER BY id", (group,))

    def finish_gap(self, gap_id: int, status: str, repair: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE gaps SET status = ?, repair = ?, repaired_at = ? WHERE id = ?",
                       (status, repair[:DETAIL_MAX], time.time(), gap_id))

    def record_conflict(self, c: Conflict) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO conflicts (time, route, bucket, key, winner_dc, winner_etag, loser_dc, loser_etag, "
                       "kept_key, resolution, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (time.time(), c.route, c.bucket, c.key, c.winner_dc, c.winner_etag, c.loser_dc, c.loser_etag,
                        c.kept_key, c.resolution, c.detail[:DETAIL_MAX]))

    def record_etag_change(self, bucket: str, key: str, source_etag: str, etag: str, layout: str,
                           reason: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO etag_changes (time, bucket, key, source_etag, etag, layout, reason) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (time.time(), bucket, key, source_etag, etag, layout, reason[:DETAIL_MAX]))

    def recent(self, kind: IncidentKind, limit: int = 50) -> list[dict[str, Any]]:
        if kind not in ("dead_letters", "quarantine", "gaps", "conflicts", "etag_changes"):
            raise ValueError(kind)
        return self.db.rows(f"SELECT * FROM {kind} ORDER BY id DESC LIMIT ?", (limit,))


_LAG_COLUMNS = ("time", "route", "events", "p50", "p99", "max", "consumer_lag", "pending_objects", "pending_bytes")


class SqlLagHistory(LagHistory):
    def __init__(self, db: Db) -> None:
        self.db = db

    def record(self, rows: Sequence[Mapping[str, Any]], retention_s: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            tx.executemany(f"INSERT INTO lag_snapshots ({', '.join(_LAG_COLUMNS)}) VALUES ({', '.join('?' * 9)})",
                           [(now, *(r[c] for c in _LAG_COLUMNS[1:])) for r in rows])
            tx.execute("DELETE FROM lag_snapshots WHERE time < ?", (now - retention_s,))

    def history(self, since: float) -> list[dict[str, Any]]:
        return self.db.rows("SELECT * FROM lag_snapshots WHERE time >= ? ORDER BY time", (since,))

    def latest(self) -> list[dict[str, Any]]:
        return self.db.rows("SELECT * FROM lag_snapshots WHERE time = (SELECT MAX(time) FROM lag_snapshots) "
                            "ORDER BY route")


# -- verify -------------------------------------------------------------------------------------
_VERIFY_COLUMNS = ("route", "started", "finished", "trigger", "source_listed", "target_listed", "missing", "extra",
                   "differ", "matched", "errors", "repaired", "sample")


class SqlVerifyHistory(VerifyHistory):
    def __init__(self, db: Db) -> None:
        self.db = db

    def record(self, run: Mapping[str, Any]) -> None:
        row = [run[c] for c in _VERIFY_COLUMNS[:-1]] + [json.dumps(list(run.get("sample") or []))]
        with self.db.transaction() as tx:
            tx.execute(f"INSERT INTO verify_runs ({', '.join(_VERIFY_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(_VERIFY_COLUMNS))})", row)

    def latest(self) -> dict[str, dict[str, Any]]:
        rows = self.db.rows("SELECT v.* FROM verify_runs v WHERE v.id = "
                            "(SELECT MAX(w.id) FROM verify_runs w WHERE w.route = v.route) ORDER BY v.route")
        return {r["route"]: _verify_row(r) for r in rows}

    def history(self, route: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.rows("SELECT * FROM verify_runs WHERE route=? ORDER BY id DESC LIMIT ?", (route, limit))
        return [_verify_row(r) for r in rows]


def _verify_row(r: dict[str, Any]) -> dict[str, Any]:
    out = dict(r)
    out["sample"] = json.loads(r["sample"] or "[]")
    return out


# -- prewarm ------------------------------------------------------------------------------------
class SqlPrewarmRecords(PrewarmRecords):
    def __init__(self, db: Db) -> None:
        self.db = db

    def record_run(self, nbytes: int, files: int, seconds: float, nodes: int = 1) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO prewarm_bandwidth (bytes, files, nodes, seconds, at) VALUES (?, ?, ?, ?, ?)",
                       (nbytes, files, nodes, seconds, time.time()))

    def runs(self, limit: int = 5, min_seconds: float = 0.2) -> list[tuple[int, int, float]]:
        rows = self.db.rows("SELECT bytes, files, seconds FROM prewarm_bandwidth WHERE seconds >= ? "
                            "ORDER BY id DESC LIMIT ?", (min_seconds, limit))
        return [(int(r["bytes"]), int(r["files"]), float(r["seconds"])) for r in rows]

    def _put_keys(self, tx: Tx, dataset: str, version: str, keys: Iterable[str]) -> int:
        tx.execute("DELETE FROM prewarm_dataset_keys WHERE dataset=? AND version=?", (dataset, version))
        return self.db.copy_rows(tx, "prewarm_dataset_keys", ("dataset", "version", "bucket_key"),
                                 ((dataset, version, k) for k in dict.fromkeys(keys)))

    def _upsert_dataset(self, tx: Tx, dataset: str, version: str, state: str, manifest_uri: str | None,
                        info: str | None) -> None:
        tx.execute(
            "INSERT INTO prewarm_datasets (dataset, version, state, manifest_uri, info, registered_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dataset, version) DO UPDATE SET state=excluded.state, "
            "manifest_uri=COALESCE(excluded.manifest_uri, prewarm_datasets.manifest_uri), "
            "info=COALESCE(excluded.info, prewarm_datasets.info), registered_at=excluded.registered_at, "
            "retired_at=NULL",
            (dataset, version, state, manifest_uri, info, time.time()))

    def stage(self, dataset: str, version: str, keys: Iterable[str], manifest_uri: str | None,
              info: Mapping[str, Any]) -> int:
        with self.db.transaction() as tx:
            self._upsert_dataset(tx, dataset, version, "staged", manifest_uri, json.dumps(dict(info)))
            return self._put_keys(tx, dataset, version, keys)

    def staged(self, dataset: str, version: str) -> tuple[list[str], dict[str, Any]] | None:
        got = self.db.rows("SELECT info FROM prewarm_datasets WHERE dataset=? AND version=?", (dataset, version))
        if not got:
            return None
        keys = [r["bucket_key"] for r in self.db.rows(
            "SELECT bucket_key FROM prewarm_dataset_keys WHERE dataset=? AND version=? ORDER BY bucket_key",
            (dataset, version))]
        return keys, json.loads(got[0]["info"] or "{}")

    def register(self, dataset: str, version: str, keys: Iterable[str] | None = None,
                 manifest_uri: str | None = None) -> int:
        with self.db.transaction() as tx:
            self._upsert_dataset(tx, dataset, version, "active", manifest_uri, None)
            if keys is not None:
                return self._put_keys(tx, dataset, version, keys)
            return int(tx.rows("SELECT COUNT(*) AS n FROM prewarm_dataset_keys WHERE dataset=? AND version=?",
                               (dataset, version))[0]["n"])

    def retire(self, dataset: str, version: str) -> bool:
        with self.db.transaction() as tx:
            # retiring twice keeps the first retirement time (room is made oldest retirement first)
            n = tx.execute("UPDATE prewarm_datasets SET state='retired', retired_at=CASE WHEN state='retired' "
                           "AND retired_at IS NOT NULL THEN retired_at ELSE ? END WHERE dataset=? AND version=?",
                           (time.time(), dataset, version))
            # a retired version is not offered to training any more, whatever its files' cache state
            tx.execute("UPDATE prewarm_ready SET ready=0 WHERE dataset=? AND version=?", (dataset, version))
        return n > 0

    _REGISTRATIONS = (
        "SELECT d.dataset, d.version, d.state, d.manifest_uri, d.retired_at, "
        "(SELECT COUNT(*) FROM prewarm_dataset_keys k WHERE k.dataset=d.dataset AND k.version=d.version) AS n "
        "FROM prewarm_datasets d")

    def registrations(self) -> list[Registration]:
        return [_registration(r) for r in self.db.rows(self._REGISTRATIONS + " ORDER BY d.dataset, d.version")]

    def retired(self) -> list[Registration]:
        rows = self.db.rows(self._REGISTRATIONS + " WHERE d.state='retired' "
                            "ORDER BY d.retired_at, d.dataset, d.version")
        return [_registration(r) for r in rows]

    def keys_of(self, dataset: str, version: str) -> list[str]:
        return [r["bucket_key"] for r in self.db.rows(
            "SELECT bucket_key FROM prewarm_dataset_keys WHERE dataset=? AND version=? ORDER BY bucket_key",
            (dataset, version))]

    def users(self, keys: Sequence[str], exclude: tuple[str, str] | None = None, *,
              staged: bool = False) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        ex_ds, ex_v = exclude or ("", "")
        states = "('active', 'staged')" if staged else "('active')"
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 900):
            chunk = uniq[i:i + 900]
            rows = self.db.rows(
                "SELECT k.bucket_key, k.dataset, k.version FROM prewarm_dataset_keys k "
                "JOIN prewarm_datasets d ON d.dataset=k.dataset AND d.version=k.version "
                f"WHERE d.state IN {states} AND k.bucket_key IN ({','.join('?' * len(chunk))}) "
                "AND NOT (k.dataset=? AND k.version=?) ORDER BY k.dataset, k.version",
                [*chunk, ex_ds, ex_v])
            for r in rows:
                out.setdefault(r["bucket_key"], []).append(f"{r['dataset']}@{r['version']}")
        return out

    def record_ready(self, dataset: str, version: str, *, ready: bool, files: int, nbytes: int,
                     cached_ratio: float, manifest_uri: str | None, now: float,
                     announce: Outgoing | None = None) -> bool:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO prewarm_ready (dataset, version, ready, files, bytes, cached_ratio, manifest_uri, "
                       "checked_at) VALUES (?, ?, 0, ?, ?, ?, ?, ?) ON CONFLICT (dataset, version) DO NOTHING",
                       (dataset, version, files, nbytes, cached_ratio, manifest_uri, now))
            became = False
            if ready:
                # The row lock makes this the one writer that flips it (two checks at once: one announces).
                became = tx.execute("UPDATE prewarm_ready SET ready=1, ready_at=? WHERE dataset=? AND version=? "
                                    "AND ready=0", (now, dataset, version)) == 1
            else:
                tx.execute("UPDATE prewarm_ready SET ready=0 WHERE dataset=? AND version=?", (dataset, version))
            tx.execute("UPDATE prewarm_ready SET files=?, bytes=?, cached_ratio=?, "
                       "manifest_uri=COALESCE(CAST(? AS TEXT), manifest_uri), checked_at=? WHERE dataset=? AND version=?",
                       (files, nbytes, cached_ratio, manifest_uri, now, dataset, version))
            if became and announce is not None:
                tx.execute("INSERT INTO outbox (topic, key, value) VALUES (?, ?, ?)",
                           (announce.topic, announce.key, announce.value))
        return became

    def readiness(self) -> list[dict[str, Any]]:
        rows = self.db.rows("SELECT * FROM prewarm_ready ORDER BY dataset, version")
        for r in rows:
            r["ready"] = bool(r["ready"])
        return rows

    def record_nodes(self, nodes: Sequence[NodeUsage]) -> None:
        now = time.time()
        with self.db.transaction() as tx:
            tx.executemany(
                "INSERT INTO cache_node_usage (node, used, capacity, high_watermark, low_watermark, updated) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node) DO UPDATE SET used=excluded.used, "
                "capacity=excluded.capacity, high_watermark=excluded.high_watermark, "
                "low_watermark=excluded.low_watermark, updated=excluded.updated",
                [(n.node, n.used, n.capacity, n.high_watermark, n.low_watermark, n.updated or now) for n in nodes])

    def nodes(self) -> list[NodeUsage]:
        return [NodeUsage(r["node"], int(r["used"]), int(r["capacity"]), float(r["high_watermark"]),
                          float(r["low_watermark"]), float(r["updated"]))
                for r in self.db.rows("SELECT * FROM cache_node_usage ORDER BY node")]

    def record_eviction(self, dataset: str, version: str, node: str, files: int, nbytes: int, reason: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO prewarm_evictions (at, dataset, version, node, files, bytes, reason) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (time.time(), dataset, version, node, files, nbytes, reason))

    def evictions(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.db.rows("SELECT * FROM prewarm_evictions ORDER BY id DESC LIMIT ?", (limit,))

    def record_progress(self, dataset: str, *, files_done: int, files_total: int, bytes_done: int,
                        bytes_total: int, eta_s: float | None, cached_ratio: float | None = None,
                        ready: bool | None = None, now: float | None = None) -> None:
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO prewarm_progress (dataset, files_done, files_total, bytes_done, bytes_total, eta_s, "
                "cached_ratio, ready, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset) DO UPDATE SET "
                "files_done=excluded.files_done, files_total=excluded.files_total, bytes_done=excluded.bytes_done, "
                "bytes_total=excluded.bytes_total, eta_s=excluded.eta_s, "
                "cached_ratio=COALESCE(excluded.cached_ratio, prewarm_progress.cached_ratio), "
                "ready=COALESCE(excluded.ready, prewarm_progress.ready), updated=excluded.updated",
                (dataset, files_done, files_total, bytes_done, bytes_total, _finite(eta_s), cached_ratio,
                 None if ready is None else int(ready), time.time() if now is None else now))

    def progress(self) -> list[dict[str, Any]]:
        return self.db.rows("SELECT * FROM prewarm_progress ORDER BY dataset")


# -- release ledger -----------------------------------------------------------------------------
def _ledger_entry(r: Mapping[str, Any]) -> LedgerEntry:
    return LedgerEntry(r["dataset"], r["version"], json.loads(r["payload"]), r["origin"], r["state"],
                       int(r["attempts"]), r["detail"], float(r["first_seen"]), float(r["updated"]))


class SqlReleaseLedger(ReleaseLedger):
    def __init__(self, db: Db) -> None:
        self.db = db

    def seen(self, dataset: str, version: str, payload: Mapping[str, Any], origin: str, *,
             state: LedgerState = "pending", now: float | None = None) -> LedgerEntry:
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            # the same delivery seen again keeps the result it has; a new delivery starts over
            tx.execute(
                "INSERT INTO release_ledger (dataset, version, payload, origin, state, attempts, detail, first_seen, "
                "updated) VALUES (?, ?, ?, ?, ?, 0, '', ?, ?) ON CONFLICT (dataset, version) DO UPDATE SET "
                "payload=excluded.payload, state=excluded.state, updated=excluded.updated, "
                "attempts=CASE WHEN release_ledger.origin=excluded.origin THEN release_ledger.attempts ELSE 0 END, "
                "detail=CASE WHEN release_ledger.origin=excluded.origin THEN release_ledger.detail ELSE '' END, "
                "origin=excluded.origin "
                "WHERE NOT (release_ledger.origin=excluded.origin AND release_ledger.state <> 'pending')",
                (dataset, version, json.dumps(dict(payload), sort_keys=True), origin, state, now, now))
            row = tx.rows("SELECT * FROM release_ledger WHERE dataset=? AND version=?", (dataset, version))[0]
        return _ledger_entry(row)

    def attempt(self, dataset: str, version: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE release_ledger SET attempts=attempts+1, updated=? WHERE dataset=? AND version=?",
                       (time.time(), dataset, version))

    def note(self, dataset: str, version: str, detail: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE release_ledger SET detail=?, updated=? WHERE dataset=? AND version=?",
                       (detail[:DETAIL_MAX], time.time(), dataset, version))

    def finish(self, dataset: str, version: str, state: LedgerState, detail: str = "") -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE release_ledger SET state=?, detail=?, updated=? WHERE dataset=? AND version=?",
                       (state, detail[:DETAIL_MAX], time.time(), dataset, version))

    def get(self, dataset: str, version: str) -> LedgerEntry | None:
        rows = self.db.rows("SELECT * FROM release_ledger WHERE dataset=? AND version=?", (dataset, version))
        return _ledger_entry(rows[0]) if rows else None

    def entries(self, states: Sequence[str] | None = None) -> list[LedgerEntry]:
        sql, params = "SELECT * FROM release_ledger", []
        if states is not None:
            if not states:
                return []
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            params = list(states)
        return [_ledger_entry(r) for r in self.db.rows(sql + " ORDER BY first_seen, dataset, version", params)]


# -- traces, config history, problems -----------------------------------------------------------
SPAN_COLUMNS = ("trace_id", "span_id", "parent_id", "name", "dc", "component", "key", "start_time", "end_time",
                "status", "error", "attributes", "links")
TRIM_EVERY = 50  # writes between two trims of the span table to max_spans


class SqlTraces(Traces):
    def __init__(self, db: Db) -> None:
        self.db = db
        self._writes = 0

    def record(self, spans: Sequence[Mapping[str, Any]], *, retention_s: float, max_spans: int,
               now: float | None = None) -> None:
        now = time.time() if now is None else now
        rows = [(s["trace_id"], s["span_id"], s.get("parent_id"), s["name"], s.get("dc") or "",
                 s.get("component") or "", s.get("key"), float(s["start_time"]), float(s["end_time"]),
                 s.get("status") or "ok", (s.get("error") or "")[:DETAIL_MAX],
                 json.dumps(s.get("attributes") or {}, default=str), json.dumps(s.get("links") or []))
                for s in spans]
        self._writes += 1
        with self.db.transaction() as tx:
            tx.executemany(f"INSERT INTO spans ({', '.join(SPAN_COLUMNS)}) VALUES ({', '.join('?' * len(SPAN_COLUMNS))}) "
                           "ON CONFLICT (trace_id, span_id) DO NOTHING", rows)
            if self._writes % TRIM_EVERY == 1:
                tx.execute("DELETE FROM spans WHERE start_time < ?", (now - retention_s,))
                tx.execute("DELETE FROM spans WHERE start_time < (SELECT start_time FROM spans "
                           "ORDER BY start_time DESC LIMIT 1 OFFSET ?)", (max_spans - 1,))

    def trace_ids(self, keys: Iterable[str], limit: int = 20) -> list[str]:
        wanted = list(dict.fromkeys(keys))
        best: dict[str, float] = {}
        for i in range(0, len(wanted), 400):
            chunk = wanted[i:i + 400]
            for r in self.db.rows(f"SELECT trace_id, MAX(end_time) AS last FROM spans WHERE key IN "
                                  f"({','.join('?' * len(chunk))}) GROUP BY trace_id", chunk):
                best[r["trace_id"]] = max(best.get(r["trace_id"], 0.0), float(r["last"]))
        return sorted(best, key=lambda t: -best[t])[:limit]

    def spans(self, trace_ids: Iterable[str]) -> list[dict[str, Any]]:
        ids = list(dict.fromkeys(trace_ids))
        out: list[dict[str, Any]] = []
        for i in range(0, len(ids), 400):
            chunk = ids[i:i + 400]
            out.extend(self.db.rows(f"SELECT * FROM spans WHERE trace_id IN ({','.join('?' * len(chunk))})", chunk))
        for r in out:
            r["attributes"] = json.loads(r["attributes"] or "{}")
            r["links"] = json.loads(r["links"] or "[]")
        return sorted(out, key=lambda r: (r["start_time"], r["end_time"]))

    def anchors(self, keys: Sequence[str], names: Sequence[str]) -> dict[str, tuple[str, str]]:
        wanted = set(keys)
        if not wanted or not names:
            return {}
        out: dict[str, tuple[str, str, float]] = {}
        # Only sampled objects have spans: list the (few) anchored keys rather than ask per key.
        for r in self.db.rows("SELECT key, trace_id, span_id, start_time FROM spans WHERE key IS NOT NULL AND "
                              f"name IN ({','.join('?' * len(names))})", list(names)):
            k = r["key"]
            if k in wanted and (k not in out or r["start_time"] > out[k][2]):
                out[k] = (r["trace_id"], r["span_id"], float(r["start_time"]))
        return {k: (t, s) for k, (t, s, _) in out.items()}

    def recent_keys(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.rows("SELECT key, trace_id, MAX(end_time) AS last FROM spans WHERE key IS NOT NULL "
                            "GROUP BY key, trace_id ORDER BY last DESC LIMIT ?", (limit * 4,))
        seen: set[str] = set()
        out = []
        for r in rows:
            if r["key"] not in seen:
                seen.add(r["key"])
                out.append({"key": r["key"], "trace_id": r["trace_id"], "last": float(r["last"])})
        return out[:limit]

    def count(self) -> int:
        return int(self.db.rows("SELECT COUNT(*) AS n FROM spans")[0]["n"])


class SqlConfigHistory(ConfigHistory):
    def __init__(self, db: Db) -> None:
        self.db = db

    def record_start(self, *, config_hash: str, body: Mapping[str, Any], component: str, host: str, pid: int,
                     dc: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO config_versions (hash, body, first_seen) VALUES (?, ?, ?) "
                       "ON CONFLICT (hash) DO NOTHING", (config_hash, json.dumps(body, sort_keys=True), now))
            got = tx.rows("INSERT INTO processes (component, host, pid, dc, config_hash, started_at, last_seen) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id", (component, host, pid, dc, config_hash, now, now))
        return int(got[0]["id"])

    def heartbeat(self, process_id: int, now: float | None = None) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE processes SET last_seen=? WHERE id=?", (time.time() if now is None else now, process_id))

    def record_stop(self, process_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            tx.execute("UPDATE processes SET last_seen=?, stopped_at=? WHERE id=?", (now, now, process_id))

    def versions(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.db.rows(
            "SELECT v.hash, v.first_seen, MAX(p.last_seen) AS last_seen, COUNT(p.id) AS processes, "
            "SUM(CASE WHEN p.stopped_at IS NULL THEN 1 ELSE 0 END) AS open_processes "
            "FROM config_versions v LEFT JOIN processes p ON p.config_hash = v.hash "
            "GROUP BY v.hash, v.first_seen ORDER BY v.first_seen DESC LIMIT ?", (limit,))

    def body(self, hash_prefix: str) -> tuple[str, dict[str, Any]] | None:
        end = prefix_end(hash_prefix)
        sql, params = "SELECT hash, body FROM config_versions WHERE hash >= ?", [hash_prefix]
        if end is not None:
            sql += " AND hash < ?"
            params.append(end)
        rows = self.db.rows(sql + " ORDER BY hash LIMIT 2", params)
        if not rows:
            return None
        if len(rows) > 1:
            raise ValueError(f"config hash {hash_prefix!r} is ambiguous: {rows[0]['hash'][:12]}, {rows[1]['hash'][:12]}, ...")
        return rows[0]["hash"], json.loads(rows[0]["body"])

    def processes(self, since: float | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM processes", []
        if since is not None:
            sql += " WHERE last_seen >= ?"
            params.append(since)
        return self.db.rows(sql + " ORDER BY started_at DESC, id DESC LIMIT 500", params)


class SqlProblemLog(ProblemLog):
    def __init__(self, db: Db) -> None:
        self.db = db

    def record(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        if not rows:
            return {}
        g, lo = self.db.greatest, self.db.least
        with self.db.transaction() as tx:
            tx.executemany(
                "INSERT INTO problems (component, signature, level, logger, template, first_seen, last_seen, hits, "
                "example) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (component, signature) DO UPDATE SET "
                f"hits = problems.hits + excluded.hits, last_seen = {g}(problems.last_seen, excluded.last_seen), "
                f"first_seen = {lo}(problems.first_seen, excluded.first_seen)",
                [(r["component"], r["signature"], r["level"], r["logger"], r["template"], r["first_seen"],
                  r["last_seen"], int(r["hits"]), (r.get("example") or "")[:DETAIL_MAX]) for r in rows])
            sigs = sorted({r["signature"] for r in rows})
            got = tx.rows(f"SELECT signature, MIN(first_seen) AS first FROM problems WHERE signature IN "
                          f"({','.join('?' * len(sigs))}) GROUP BY signature", sigs)
        return {r["signature"]: float(r["first"]) for r in got}

    def recent(self, limit: int = 100, since: float | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM problems", []
        if since is not None:
            sql += " WHERE first_seen >= ?"
            params.append(since)
        return self.db.rows(sql + " ORDER BY first_seen DESC, signature LIMIT ?", [*params, limit])
