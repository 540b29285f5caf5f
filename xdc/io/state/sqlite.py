"""SQLite state: the embedded default, one file per datacenter, one writer at a time.

WAL so readers never block the writer; synchronous=FULL so a committed batch survives a power cut
before its Kafka offsets are committed. Several processes may share the file (the mirror, prewarm,
the dashboard), but only one mirror and one resize process: `lease(role)` holds an exclusive lock
on `<file>.<role>.lock` (flock: the kernel drops it when the process dies, even by SIGKILL) and a
second process is refused with the holder's pid. Outbox rows are published under another such
lock (`<file>.outbox.lock`), waited for, so no transaction stays open while they are sent.
Replicas need a server database (PostgreSQL).
"""
from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xdc.errors import ReplicaRefused, StateError, TransientStateError
from xdc.io.state.base import State
from xdc.io.state.sql import (
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
)


def _translate(exc: sqlite3.Error, what: str) -> StateError:
    if isinstance(exc, sqlite3.OperationalError):  # locked, busy, disk I/O: worth another try
        return TransientStateError(f"{what}: {exc}")
    return StateError(f"{what}: {exc}")


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, params)]


class SqliteDb(Db):
    dialect = "sqlite"
    greatest = "MAX"
    least = "MIN"

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.synchronous = "FULL" if durable else "NORMAL"  # NORMAL in WAL: consistent, not fsynced per commit
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conns = ThreadConnections(self._connect)

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")  # FULL: durable before offsets are committed
        except sqlite3.Error as exc:
            raise _translate(exc, f"open {self.path}") from exc
        conn.row_factory = sqlite3.Row
        return conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            return [dict(r) for r in self._conns.get().execute(sql, params)]
        except sqlite3.Error as exc:
            raise _translate(exc, f"read {self.path}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        conn = self._conns.get()
        try:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
        except sqlite3.Error as exc:
            raise _translate(exc, f"begin on {self.path}") from exc
        try:
            yield _SqliteTx(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise _translate(exc, f"write {self.path}") from exc
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def lock_schema(self, tx: Tx) -> None:
        pass  # BEGIN IMMEDIATE already excludes every other writer

    def close(self) -> None:
        self._conns.close()


@contextmanager
def waited_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for the block, waited for."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_LEASES: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, holders in this process)
_LEASES_LOCK = threading.Lock()


def _take(path: Path, role: str, db: Path) -> int:
    """The lease's lock, or ReplicaRefused naming the process that holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text(errors="replace").strip() or "a process"
        raise ReplicaRefused(
            f"another {role} process already runs on the SQLite state {db} ({holder}): SQLite state takes one "
            f"{role} process. Stop the other one, or use a postgresql:// state_url to run {role} replicas "
            "(docs/scale.md)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    return fd


class SqliteState(State):
    backend = "sqlite"
    supports_replicas = False

    def __init__(self, path: str | Path, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.db = SqliteDb(self.path, durable=durable)
        self._version = self.db.migrate()
        self.catalog = SqlCatalog(self.db, publisher=lambda: waited_lock(self._lock_path("outbox")))
        self.incidents = SqlIncidents(self.db)
        self.lag = SqlLagHistory(self.db)
        self.verify = SqlVerifyHistory(self.db)
        self.prewarm = SqlPrewarmRecords(self.db)
        self.releases = SqlReleaseLedger(self.db)
        self.traces = SqlTraces(self.db)
        self.configs = SqlConfigHistory(self.db)
        self.problems = SqlProblemLog(self.db)

    def _lock_path(self, what: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{what}.lock")

    @contextmanager
    def lease(self, role: str) -> Iterator[None]:
        """Per process (re-entrant: the CLI takes it before its HTTP endpoint, the loop again)."""
        path = self._lock_path(role).resolve()
        with _LEASES_LOCK:
            held = _LEASES.get(path)
            if held is not None:
                _LEASES[path] = (held[0], held[1] + 1)
        if held is None:
            fd = _take(path, role, self.path)
            with _LEASES_LOCK:
                _LEASES[path] = (fd, 1)
        try:
            yield
        finally:
            with _LEASES_LOCK:
                fd, n = _LEASES[path]
                if n > 1:
                    _LEASES[path] = (fd, n - 1)
                else:
                    del _LEASES[path]
                    os.close(fd)  # releases the lock

    def schema_version(self) -> int:
        return self._version

    def describe(self) -> str:
        return f"sqlite:///{self.path}"

    def close(self) -> None:
        self.db.close()
