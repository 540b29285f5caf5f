"""PostgreSQL state (psycopg 3): several writers, so mirror and resize replicas can share it.

What differs from SQLite, and why:
- the batch upsert is a binary COPY into a session's temporary staging table, then one statement
  (`INSERT ... SELECT FROM objects_stage ON CONFLICT ... WHERE newer RETURNING`): COPY rows are
  encoded in C (arrays as parameters were dumped in Python, a third of the apply time), and
  RETURNING names exactly the rows this writer applied, so the sequencer guard holds under
  concurrent upserts;
- outbox rows are claimed per message key under a session advisory lock (`pg_try_advisory_lock`):
  each row is published by one replica, one key's rows in order, and the server drops the locks of
  a replica that dies with its session; no transaction stays open while rows are published;
- bulk key lists go in with COPY;
- schema migrations take an advisory lock, so replicas starting together migrate once.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.sql
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from xdc.errors import StateError, TransientStateError
from xdc.io.state.base import CatalogEntry, OutboxClaim, State
from xdc.io.state.sql import (
    IF_NEWER,
    INSERT_OBJECTS,
    OBJECT_COLUMNS,
    OUTBOX_COLUMNS,
    OUTBOX_FROM,
    Db,
    SqlCatalog,
    SqlClaim,
    SqlIncidents,
    SqlLagHistory,
    SqlConfigHistory,
    SqlPrewarmRecords,
    SqlVerifyHistory,
    SqlReleaseLedger,
    SqlProblemLog,
    SqlTraces,
    ThreadConnections,
    Tx,
    entry_of,
    if_reconciled,
    outbox_row,
    row_of,
)

_SCHEMA_LOCK = 0x78646373  # "xdcs": pg_advisory_xact_lock key for migrations
_OUTBOX_LOCKS = 0x78646F62  # "xdob": the class of the outbox's per-key advisory locks


def _key_lock(o: str = "") -> str:
    """The outbox lock of a row's message key (a hash: two keys that collide share a lock, which
    only serialises them). `o`: the table alias."""
    p = f"{o}." if o else ""
    return f"hashtext({p}topic || '/' || encode(COALESCE({p}key, ''::bytea), 'hex'))"
KEEPALIVE = (10, 3, 3)  # idle seconds, interval seconds, probes
_TRANSIENT = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.LockNotAvailable,
              pg_errors.QueryCanceled, pg_errors.AdminShutdown)
_OBJECT_TYPES = ("text", "text", "int8", "text", "text", "int4", "float8", "float8",
                 "text", "text", "text", "text", "text", "text", "text", "text", "text")
# The staging table of the batch upsert: per session, emptied at every commit. Created in each
# upsert's transaction (IF NOT EXISTS), so a pooler that hands out another session still finds it.
_STAGE = "objects_stage"
_CREATE_STAGE = (f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ("
                 + ", ".join(f"{c} {t}" for c, t in zip(OBJECT_COLUMNS, _OBJECT_TYPES, strict=True)) + ") ON COMMIT DELETE ROWS")


@functools.lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """`?` placeholders -> psycopg's `%s` (a literal % is doubled first)."""
    return sql.replace("%", "%%").replace("?", "%s")


def masked_url(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:****@", url)


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.cur = conn.cursor()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.cur.execute(_pg(sql), params)
        return self.cur.rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            self.cur.executemany(_pg(sql), rows)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self.cur.execute(_pg(sql), params)
        return list(self.cur.fetchall())


class PostgresDb(Db):
    dialect = "postgres"
    greatest = "GREATEST"
    least = "LEAST"

    def __init__(self, url: str, *, password: str | None = None, connect_timeout_s: int = 10,
                 durable: bool = True) -> None:
        self.url = url
        self.durable = durable
        self._password = password
        self._timeout = connect_timeout_s
        self._conns = ThreadConnections(self._connect)

    def _connect(self) -> psycopg.Connection[Any]:
        # TCP keepalives both ways: this client notices a server that vanished, and the server drops
        # the session of a replica whose node vanished (its outbox locks go with it) in about 20 s
        # instead of the kernel's two hours
        kw: dict[str, Any] = {"autocommit": True, "row_factory": dict_row, "connect_timeout": self._timeout,
                              "keepalives": 1, "keepalives_idle": KEEPALIVE[0], "keepalives_interval": KEEPALIVE[1],
                              "keepalives_count": KEEPALIVE[2]}
        if self._password is not None:
            kw["password"] = self._password
        try:
            conn = psycopg.connect(self.url, **kw)
            conn.execute(f"SET tcp_keepalives_idle = {KEEPALIVE[0]}; SET tcp_keepalives_interval = {KEEPALIVE[1]}; "
                         f"SET tcp_keepalives_count = {KEEPALIVE[2]}")
            if not self.durable:  # telemetry writes: no wait for the WAL flush
                conn.execute("SET synchronous_commit = off")
            return conn
        except psycopg.Error as exc:
            # the message names host, port and database, never the password
            raise TransientStateError(f"connect to {masked_url(self.url)}: {str(exc).strip()}") from exc

    def _fail(self, exc: psycopg.Error, what: str) -> StateError:
        if isinstance(exc, psycopg.OperationalError) or isinstance(exc, _TRANSIENT):
            conn = self._conns.get()
            if conn.broken or conn.closed:
                self._conns.drop()
            return TransientStateError(f"{what} on {masked_url(self.url)}: {str(exc).strip()}")
        return StateError(f"{what} on {masked_url(self.url)}: {str(exc).strip()}")

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        conn = self._conns.get()
        try:
            with conn.cursor() as cur:
                cur.execute(_pg(sql), params)
                return list(cur.fetchall())
        except psycopg.Error as exc:
            raise self._fail(exc, "read") from exc

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        conn = self._conns.get()
        try:
            with conn.transaction():
                yield _PgTx(conn)
        except psycopg.Error as exc:
            raise self._fail(exc, "write") from exc

    def lock_schema(self, tx: Tx) -> None:
        tx.rows("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))

    def copy_rows(self, tx: Tx, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        assert isinstance(tx, _PgTx)
        n = 0
        with tx.cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
                n += 1
        return n

    def close(self) -> None:
        self._conns.close()


class PostgresCatalog(SqlCatalog):
    @contextmanager
    def claim_outbox(self, limit: int = 10_000) -> Iterator[OutboxClaim]:
        if not self.db.rows("SELECT 1 AS x FROM outbox LIMIT 1"):
            yield SqlClaim(self.db, [])
            return
        # Session locks (on this thread's connection, outside any transaction): a key another
        # publisher holds is skipped, never waited for (pg_try_ never blocks, so no deadlock).
        locked = [int(r["h"]) for r in self.db.rows(
            f"SELECT k.h FROM (SELECT DISTINCT {_key_lock()} AS h FROM outbox) k WHERE pg_try_advisory_lock(?, k.h)",
            (_OUTBOX_LOCKS,))]
        held = list(locked)
        try:
            rows = self.db.rows(
                f"{OUTBOX_COLUMNS}, {_key_lock('o')} AS h {OUTBOX_FROM} "
                f"WHERE {_key_lock('o')} = ANY(?::int[]) ORDER BY o.id LIMIT ?",
                (locked, limit)) if locked else []
            used = {int(r["h"]) for r in rows}
            self._unlock([h for h in held if h not in used])  # keys the limit left out: free them now
            held = [h for h in held if h in used]
            claimed = [outbox_row(r) for r in rows]
            yield SqlClaim(self.db, claimed)
            self._delete_outbox([r.id for r in claimed])
        finally:
            self._unlock(held)

    def _unlock(self, hashes: list[int]) -> None:
        if not hashes:
            return
        try:
            self.db.rows("SELECT pg_advisory_unlock(?, h) AS ok FROM unnest(?::int[]) AS h", (_OUTBOX_LOCKS, hashes))
        except TransientStateError:
            pass  # the session is gone, and its locks with it

    def get_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], CatalogEntry]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        rows = self.db.rows(
            'SELECT o.* FROM objects o JOIN unnest(?::text[], ?::text[]) AS k(bucket, key) '
            'ON o.bucket = k.bucket COLLATE "C" AND o.key = k.key COLLATE "C"',
            ([b for b, _ in wanted], [k for _, k in wanted]))
        out = {}
        for r in rows:
            e = entry_of(r)
            out[(e.bucket, e.key)] = e
        return out

    def _upsert(self, tx: Tx, entries: list[CatalogEntry], always: bool = False) -> list[CatalogEntry]:
        if not entries:
            return []
        assert isinstance(tx, _PgTx)
        tx.execute(_CREATE_STAGE)
        tx.execute(f"DELETE FROM {_STAGE}")  # a batch's reconciliations follow its S3 events in one transaction
        with tx.cur.copy(f"COPY {_STAGE} ({', '.join(OBJECT_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(_OBJECT_TYPES)
            for e in entries:
                cp.write_row(row_of(e))
        clause = if_reconciled(self.db.greatest) if always else IF_NEWER
        got = {(r["bucket"], r["key"]) for r in tx.rows(
            f"{INSERT_OBJECTS} SELECT {', '.join(OBJECT_COLUMNS)} FROM {_STAGE} {clause} RETURNING bucket, key")}
        if always or len(got) == len(entries):
            return list(entries)
        return [e for e in entries if (e.bucket, e.key) in got]


class PostgresState(State):
    backend = "postgres"
    supports_replicas = True

    def __init__(self, url: str, *, password: str | None = None, durable: bool = True) -> None:
        self.url = url
        self.db = PostgresDb(url, password=password, durable=durable)
        self._version = self.db.migrate()
        self.catalog = PostgresCatalog(self.db)
        self.incidents = SqlIncidents(self.db)
        self.lag = SqlLagHistory(self.db)
        self.verify = SqlVerifyHistory(self.db)
        self.prewarm = SqlPrewarmRecords(self.db)
        self.releases = SqlReleaseLedger(self.db)
        self.traces = SqlTraces(self.db)
        self.configs = SqlConfigHistory(self.db)
        self.problems = SqlProblemLog(self.db)

    def schema_version(self) -> int:
        return self._version

    def describe(self) -> str:
        return masked_url(self.url)

    def close(self) -> None:
        self.db.close()


def create_database(admin_url: str, name: str) -> None:
    """CREATE DATABASE `name` unless it exists (connected to `admin_url`, e.g. .../postgres)."""
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (name,)).fetchone():
                conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    except psycopg.Error as exc:
        raise StateError(f"create database {name} on {masked_url(admin_url)}: {str(exc).strip()}") from exc


def create_schema(url: str, schema: str) -> None:
    """CREATE SCHEMA `schema` unless it exists (a state per schema: state_url with search_path)."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(psycopg.sql.Identifier(schema)))
    except psycopg.Error as exc:
        raise StateError(f"create schema {schema} on {masked_url(url)}: {str(exc).strip()}") from exc


assert len(_OBJECT_TYPES) == len(OBJECT_COLUMNS)
