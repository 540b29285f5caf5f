"""A datacenter's state, on SQLite (embedded default) or PostgreSQL, chosen by URL.

    sqlite:///relative/or/absolute/path.db     one file, one writer process at a time
    postgresql://user@host:port/database        several writers (mirror and resize replicas)
"""
from __future__ import annotations

from pathlib import Path

from xdc.errors import ConfigError
from xdc.io.state.base import (
    CatalogEntry,
    ConfigHistory,
    Conflict,
    Gap,
    Incidents,
    LagHistory,
    LedgerEntry,
    MetaChange,
    NodeUsage,
    ObjectCatalog,
    Outgoing,
    OutboxClaim,
    OutboxRow,
    PrewarmRecords,
    ProblemLog,
    Registration,
    ReleaseLedger,
    State,
    Traces,
    VerifyHistory,
)
from xdc.io.state.postgres import PostgresState
from xdc.io.state.sqlite import SqliteState

__all__ = ["open_state", "sqlite_path", "takes_replicas", "State", "ObjectCatalog", "Incidents", "LagHistory",
           "PrewarmRecords", "CatalogEntry", "MetaChange", "Outgoing", "OutboxClaim", "OutboxRow", "Gap", "Conflict",
           "VerifyHistory", "Registration", "ReleaseLedger", "LedgerEntry", "NodeUsage", "Traces", "ConfigHistory",
           "ProblemLog"]


def sqlite_path(url: str, base_dir: Path) -> Path:
    """The file of a sqlite:/// URL; relative paths are relative to `base_dir` (the config's dir)."""
    p = Path(url.removeprefix("sqlite:///"))
    return p if p.is_absolute() else base_dir / p


def takes_replicas(url: str) -> bool:
    """Whether the state at `url` takes several mirror and resize processes: a server database
    (PostgreSQL) does; a SQLite file takes one of each."""
    return url.startswith(("postgresql://", "postgres://"))


def open_state(url: str, *, base_dir: Path = Path("."), password: str | None = None, durable: bool = True) -> State:
    """Open (and migrate) the state at `url`.

    `durable=False`: commits of this handle are not flushed to disk one by one (SQLite
    synchronous=NORMAL, PostgreSQL synchronous_commit=off): for telemetry (spans, problem counts),
    whose writes must not hold the database's write lock for an fsync the mirror then waits on.
    Never for the catalog's batches."""
    if url.startswith("sqlite:///"):
        return SqliteState(sqlite_path(url, base_dir), durable=durable)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresState(url, password=password, durable=durable)
    raise ConfigError(f"state URL must be sqlite:///PATH or postgresql://...: {url!r}")
