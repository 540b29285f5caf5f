"""PostgreSQL state (psycopg 3): several writers, so mirror and resize replicas can share it.

What differs from SQLite, and why:
- the batch upsert is one statement over arrays (`INSERT ... SELECT FROM unnest(...) ON CONFLICT
  ... WHERE newer RETURNING`): one round trip per batch, and RETURNING names exactly the rows this
  writer applied, so the sequencer guard holds under concurrent upserts;
- outbox rows are claimed `FOR UPDATE SKIP LOCKED`: each applied event is published by one replica;
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
from xdc.io.state.base import CatalogEntry, State
from xdc.io.state.sql import (
    IF_NEWER,
    INSERT_OBJECTS,
    OBJECT_COLUMNS,
    Db,
    SqlCatalog,
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
    row_of,
)

_SCHEMA_LOCK = 0x78646373  # "xdcs": pg_advisory_xact_lock key for migrations
_TRANSIENT = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.LockNotAvailable,
              pg_errors.QueryCanceled, pg_errors.AdminShutdown)
_OBJECT_TYPES = ("text", "text", "bigint", "text", "text", "int", "float8", "float8",
                 "text", "text", "text", "text", "text", "text", "text", "text", "text")


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
        kw: dict[str, Any] = {"autocommit": True, "row_factory": dict_row, "connect_timeout": self._timeout}
        if self._password is not None:
            kw["password"] = self._password
        try:
            conn = psycopg.connect(self.url, **kw)
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
    claim_suffix = " FOR UPDATE SKIP LOCKED"

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
        columns = [list(c) for c in zip(*(row_of(e) for e in entries))]
        arrays = ", ".join(f"?::{t}[]" for t in _OBJECT_TYPES)
        clause = if_reconciled(self.db.greatest) if always else IF_NEWER
        sql = f"{INSERT_OBJECTS} SELECT * FROM unnest({arrays}) {clause} RETURNING bucket, key"
        got = {(r["bucket"], r["key"]) for r in tx.rows(sql, columns)}
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
