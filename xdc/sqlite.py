"""Short SQLite connections to a datacenter's catalog file, which several processes share."""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def short_connection(path: str | Path) -> Iterator[sqlite3.Connection]:
    """One connection for one unit of work, committed on success; WAL so readers never block."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        with db:
            yield db
    finally:
        db.close()
