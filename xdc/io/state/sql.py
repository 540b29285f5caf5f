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
    IncidentKind,
    Incidents,
    LagHistory,
    ObjectCatalog,
    Offsets,
    Outgoing,
    OutboxClaim,
    OutboxRow,
    PrewarmRecords,
    Registration,
)
from xdc.io.state.schema import MIGRATIONS

CHUNK = 5000  # rows per executemany / IN (...) chunk
PAGE = 5000  # rows per page when streaming a route
DETAIL_MAX = 2000

OBJECT_COLUMNS = ("bucket", "key", "size", "etag", "sequencer", "deleted", "event_time", "applied_time",
                  "route", "mode", "source_dc", "source_bucket", "source_key", "source_etag")


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
                        r["source_bucket"], r["source_key"], r["source_etag"])


def row_of(e: CatalogEntry) -> tuple[Any, ...]:
    return (e.bucket, e.key, e.size, e.etag, e.sequencer, int(e.deleted), e.event_time, e.applied_time,
            e.route, e.mode, e.source_dc, e.source_bucket, e.source_key, e.source_etag)


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
    return OutboxRow(int(r["id"]), Outgoing(r["topic"], _bytes(r["key"]), _bytes(r["value"]) or b""), tried)


# an outbox row with its send mark; a backend may add columns between the two
OUTBOX_COLUMNS = "SELECT o.id, o.topic, o.key, o.value, t.part, t.from_offset"
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
                     offsets: Offsets) -> list[CatalogEntry]:
        entries = _newest_per_key(entries)
        with self.db.transaction() as tx:
            applied = self._upsert(tx, entries)
            tx.executemany("INSERT INTO outbox (topic, key, value) VALUES (?, ?, ?)",
                           [(o.topic, o.key, o.value) for o in outbox(applied)])
            tx.executemany(
                "INSERT INTO offsets (grp, topic, part, next_offset) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (grp, topic, part) DO UPDATE SET "
                f"next_offset={self.db.greatest}(offsets.next_offset, excluded.next_offset)",
                [(g, t, p, o) for (g, t, p), o in offsets.items()])
        return applied

    def _upsert(self, tx: Tx, entries: list[CatalogEntry]) -> list[CatalogEntry]:
        """Upsert where newer; returns the entries applied. Here (SQLite) the transaction holds the
        database's one write lock, so the sequencers read inside it decide exactly which entries
        win; a backend with several writers decides in the statement itself (PostgreSQL)."""
        if not entries:
            return []
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

    def recent(self, kind: IncidentKind, limit: int = 50) -> list[dict[str, Any]]:
        if kind not in ("dead_letters", "quarantine"):
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
            n = tx.execute("UPDATE prewarm_datasets SET state='retired', retired_at=? WHERE dataset=? AND version=?",
                           (time.time(), dataset, version))
        return n > 0

    def registrations(self) -> list[Registration]:
        rows = self.db.rows(
            "SELECT d.dataset, d.version, d.state, d.manifest_uri, "
            "(SELECT COUNT(*) FROM prewarm_dataset_keys k WHERE k.dataset=d.dataset AND k.version=d.version) AS n "
            "FROM prewarm_datasets d ORDER BY d.dataset, d.version")
        return [Registration(r["dataset"], r["version"], r["state"], r["manifest_uri"], int(r["n"])) for r in rows]

    def users(self, keys: Sequence[str], exclude: tuple[str, str] | None = None) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        ex_ds, ex_v = exclude or ("", "")
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 900):
            chunk = uniq[i:i + 900]
            rows = self.db.rows(
                "SELECT k.bucket_key, k.dataset, k.version FROM prewarm_dataset_keys k "
                "JOIN prewarm_datasets d ON d.dataset=k.dataset AND d.version=k.version "
                f"WHERE d.state='active' AND k.bucket_key IN ({','.join('?' * len(chunk))}) "
                "AND NOT (k.dataset=? AND k.version=?) ORDER BY k.dataset, k.version",
                [*chunk, ex_ds, ex_v])
            for r in rows:
                out.setdefault(r["bucket_key"], []).append(f"{r['dataset']}@{r['version']}")
        return out

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
