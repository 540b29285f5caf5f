"""The catalog: what each datacenter holds, per object, with event and applied times.

One SQLite file per datacenter (WAL mode). A batch is applied in one transaction together with its
outbox rows (the applied events to publish) and the consumed offsets, so the catalog, the offsets
it has seen and the events it owes downstream never disagree after a crash.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL, key TEXT NOT NULL,
    size INTEGER NOT NULL, etag TEXT NOT NULL, sequencer TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,          -- tombstone: keeps the sequencer of the delete
    event_time REAL NOT NULL, applied_time REAL NOT NULL,
    route TEXT NOT NULL, mode TEXT NOT NULL,
    source_dc TEXT NOT NULL, source_bucket TEXT NOT NULL, source_key TEXT NOT NULL,
    source_etag TEXT NOT NULL,
    PRIMARY KEY (bucket, key)
);
CREATE INDEX IF NOT EXISTS objects_route ON objects(route, source_key);
CREATE INDEX IF NOT EXISTS objects_applied ON objects(applied_time);
CREATE TABLE IF NOT EXISTS offsets (
    grp TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, part)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, key BLOB, value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, topic TEXT NOT NULL,
    part INTEGER, "offset" INTEGER, reason TEXT NOT NULL, detail TEXT NOT NULL, size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, bucket TEXT NOT NULL, key TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lag_snapshots (
    time REAL NOT NULL, route TEXT NOT NULL, events INTEGER NOT NULL,
    p50 REAL, p99 REAL, max REAL, consumer_lag INTEGER, pending_objects INTEGER, pending_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS lag_time ON lag_snapshots(time);
"""


@dataclass(frozen=True)
class CatalogEntry:
    bucket: str
    key: str
    size: int
    etag: str
    sequencer: str
    deleted: bool
    event_time: float
    applied_time: float
    route: str
    mode: str
    source_dc: str
    source_bucket: str
    source_key: str
    source_etag: str


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes


class Catalog(ABC):
    """What a datacenter holds. Backends: SQLite (default)."""

    @abstractmethod
    def get_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], CatalogEntry]: ...

    @abstractmethod
    def commit_batch(self, entries: Sequence[CatalogEntry],
                     outbox: Callable[[list[CatalogEntry]], Sequence[Outgoing]],
                     offsets: dict[tuple[str, str, int], int]) -> list[CatalogEntry]:
        """Upsert entries where newer, queue the outbox rows of those applied, record offsets:
        atomically. Returns the entries applied."""

    @abstractmethod
    def pending_outbox(self, limit: int = 10_000) -> list[tuple[int, Outgoing]]: ...

    @abstractmethod
    def ack_outbox(self, ids: Sequence[int]) -> None: ...

    @abstractmethod
    def iter_route(self, route: str, prefix: str = "") -> Iterator[CatalogEntry]:
        """Live (not deleted) entries of a route, in source-key order."""


class SqliteCatalog(Catalog):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # durable before offsets are committed
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- reads -------------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(self._conn().execute(sql, params))

    def get_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], CatalogEntry]:
        out: dict[tuple[str, str], CatalogEntry] = {}
        keys = list(dict.fromkeys(keys))
        conn = self._conn()
        for i in range(0, len(keys), 400):
            chunk = keys[i:i + 400]
            where = " OR ".join(["(bucket=? AND key=?)"] * len(chunk))
            params = [x for bk in chunk for x in bk]
            for row in conn.execute(f"SELECT * FROM objects WHERE {where}", params):
                e = _entry(row)
                out[(e.bucket, e.key)] = e
        return out

    def get(self, bucket: str, key: str) -> CatalogEntry | None:
        return self.get_many([(bucket, key)]).get((bucket, key))

    def iter_route(self, route: str, prefix: str = "") -> Iterator[CatalogEntry]:
        cur = self._conn().execute(
            "SELECT * FROM objects WHERE route=? AND deleted=0 AND substr(source_key,1,?)=? ORDER BY source_key",
            (route, len(prefix), prefix))
        for row in cur:
            yield _entry(row)

    def live_objects(self, bucket: str | None = None) -> list[CatalogEntry]:
        sql, params = "SELECT * FROM objects WHERE deleted=0", []
        if bucket:
            sql += " AND bucket=?"
            params.append(bucket)
        return [_entry(r) for r in self._conn().execute(sql + " ORDER BY bucket, key", params)]

    def offsets(self, group: str) -> dict[tuple[str, int], int]:
        rows = self._conn().execute("SELECT topic, part, next_offset FROM offsets WHERE grp=?", (group,))
        return {(r["topic"], r["part"]): r["next_offset"] for r in rows}

    def counts(self) -> dict[str, int]:
        r = self._conn().execute(
            "SELECT COUNT(*) n, COALESCE(SUM(size),0) b, COALESCE(SUM(deleted),0) d FROM objects").fetchone()
        return {"objects": r["n"] - r["d"], "bytes": r["b"], "tombstones": r["d"]}

    def lags(self, since: float, route: str | None = None) -> list[float]:
        sql = "SELECT applied_time - event_time AS lag FROM objects WHERE applied_time >= ?"
        params: list[Any] = [since]
        if route:
            sql += " AND route=?"
            params.append(route)
        return [r["lag"] for r in self._conn().execute(sql, params)]

    # -- writes ------------------------------------------------------------------------------
    def commit_batch(self, entries: Sequence[CatalogEntry],
                     outbox: Callable[[list[CatalogEntry]], Sequence[Outgoing]],
                     offsets: dict[tuple[str, str, int], int]) -> list[CatalogEntry]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.total_changes
            conn.executemany(_UPSERT, [_row(e) for e in entries])
            applied = list(entries)
            if conn.total_changes - before != len(entries):
                # The sequencer guard kept some newer rows (another mirror got there first): only
                # the rows that now hold our sequencer were applied by us.
                held = self.get_many((e.bucket, e.key) for e in entries)
                applied = [e for e in entries if held[(e.bucket, e.key)].sequencer == e.sequencer]
            conn.executemany("INSERT INTO outbox(topic, key, value) VALUES (?,?,?)",
                             [(o.topic, o.key, o.value) for o in outbox(applied)])
            conn.executemany(
                "INSERT INTO offsets VALUES (?,?,?,?) ON CONFLICT(grp, topic, part) DO UPDATE SET "
                "next_offset=MAX(next_offset, excluded.next_offset)",
                [(g, t, p, o) for (g, t, p), o in offsets.items()])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return applied

    def pending_outbox(self, limit: int = 10_000) -> list[tuple[int, Outgoing]]:
        rows = self._conn().execute("SELECT id, topic, key, value FROM outbox ORDER BY id LIMIT ?", (limit,))
        return [(r["id"], Outgoing(r["topic"], r["key"], r["value"])) for r in rows]

    def ack_outbox(self, ids: Sequence[int]) -> None:
        conn = self._conn()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            conn.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def record_dead_letter(self, topic: str, partition: int | None, offset: int | None, reason: str,
                           detail: str, size: int) -> None:
        self._conn().execute(
            'INSERT INTO dead_letters(time, topic, part, "offset", reason, detail, size) VALUES (?,?,?,?,?,?,?)',
            (time.time(), topic, partition, offset, reason, detail[:2000], size))

    def record_quarantine(self, bucket: str, key: str, reason: str, detail: str) -> None:
        self._conn().execute("INSERT INTO quarantine(time, bucket, key, reason, detail) VALUES (?,?,?,?,?)",
                             (time.time(), bucket, key, reason, detail[:2000]))

    def record_lag_snapshot(self, rows: Sequence[dict[str, Any]], retention_s: float) -> None:
        conn = self._conn()
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO lag_snapshots VALUES (:time,:route,:events,:p50,:p99,:max,:consumer_lag,"
                ":pending_objects,:pending_bytes)", [{"time": now, **r} for r in rows])
            conn.execute("DELETE FROM lag_snapshots WHERE time < ?", (now - retention_s,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def recent(self, table: str, limit: int = 50) -> list[dict[str, Any]]:
        if table not in ("dead_letters", "quarantine"):
            raise ValueError(table)
        return [dict(r) for r in self._conn().execute(f"SELECT * FROM {table} ORDER BY id DESC LIMIT ?", (limit,))]

    def lag_history(self, since: float) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn().execute(
            "SELECT * FROM lag_snapshots WHERE time >= ? ORDER BY time", (since,))]

    def route_totals(self) -> dict[str, dict[str, int]]:
        """route -> live objects, their bytes, tombstones (what the dashboard shows per route)."""
        rows = self._conn().execute(
            "SELECT route, COUNT(*) - SUM(deleted) n, COALESCE(SUM(CASE WHEN deleted=0 THEN size END),0) b, "
            "SUM(deleted) d FROM objects GROUP BY route")
        return {r["route"]: {"objects": r["n"], "bytes": r["b"], "tombstones": r["d"]} for r in rows}

    def latest_lag_snapshot(self) -> list[dict[str, Any]]:
        """The rows of the most recent lag snapshot (one per route), [] if none."""
        return [dict(r) for r in self._conn().execute(
            "SELECT * FROM lag_snapshots WHERE time = (SELECT MAX(time) FROM lag_snapshots) ORDER BY route")]


_UPSERT = (
    "INSERT INTO objects VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(bucket, key) DO UPDATE SET size=excluded.size, etag=excluded.etag, "
    "sequencer=excluded.sequencer, deleted=excluded.deleted, event_time=excluded.event_time, "
    "applied_time=excluded.applied_time, route=excluded.route, mode=excluded.mode, "
    "source_dc=excluded.source_dc, source_bucket=excluded.source_bucket, "
    "source_key=excluded.source_key, source_etag=excluded.source_etag "
    # the guard that makes apply idempotent and ordered per key, even across processes
    "WHERE excluded.sequencer > objects.sequencer")


def _row(e: CatalogEntry) -> tuple[Any, ...]:
    return (e.bucket, e.key, e.size, e.etag, e.sequencer, int(e.deleted), e.event_time, e.applied_time,
            e.route, e.mode, e.source_dc, e.source_bucket, e.source_key, e.source_etag)


def _entry(r: sqlite3.Row) -> CatalogEntry:
    return CatalogEntry(r["bucket"], r["key"], r["size"], r["etag"], r["sequencer"], bool(r["deleted"]),
                        r["event_time"], r["applied_time"], r["route"], r["mode"], r["source_dc"],
                        r["source_bucket"], r["source_key"], r["source_etag"])

