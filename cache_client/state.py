"""Prewarm state kept in the datacenter's catalog (SQLite): measured bandwidth, dataset registrations.

Tables are prefixed `prewarm_` because they live beside the catalog's own tables.

- prewarm_bandwidth: one row per warm run (dc, bytes, files, nodes, seconds, at) -> ETA estimate.
- prewarm_datasets: (dataset, version, dc) -> state active|retired, manifest uri.
- prewarm_dataset_keys: the registration's bucket keys, one row each, inserted in chunks from an
  iterator so a 10-million-line manifest never sits in memory; indexed by (dc, bucket_key) so
  "who else uses these keys" is a join, not a scan.
"""
from __future__ import annotations

import sqlite3
import statistics
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from cache_client.plan import MIB, Bandwidth, DEFAULT_PER_FILE_SECONDS
from xdc.sqlite import short_connection

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prewarm_bandwidth (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dc TEXT NOT NULL, bytes INTEGER NOT NULL, files INTEGER NOT NULL, nodes INTEGER NOT NULL,
    seconds REAL NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS prewarm_bandwidth_dc ON prewarm_bandwidth (dc, id);
CREATE TABLE IF NOT EXISTS prewarm_datasets (
    dataset TEXT NOT NULL, version TEXT NOT NULL, dc TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'retired')),
    manifest_uri TEXT, registered_at REAL NOT NULL, retired_at REAL,
    PRIMARY KEY (dataset, version, dc)
);
CREATE TABLE IF NOT EXISTS prewarm_dataset_keys (
    dataset TEXT NOT NULL, version TEXT NOT NULL, dc TEXT NOT NULL, bucket_key TEXT NOT NULL,
    PRIMARY KEY (dataset, version, dc, bucket_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS prewarm_dataset_keys_key ON prewarm_dataset_keys (dc, bucket_key);
"""
_CHUNK = 5000
RECENT_RUNS = 5
# Runs this short say more about process start-up than about bandwidth.
MIN_RUN_SECONDS = 0.2


@dataclass(frozen=True)
class Registration:
    dataset: str
    version: str
    dc: str
    state: str
    manifest_uri: str | None
    keys: int


class PrewarmState:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return short_connection(self.path)

    # -- bandwidth ------------------------------------------------------------------------------
    def record_run(self, dc: str, nbytes: int, files: int, seconds: float, nodes: int = 1) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO prewarm_bandwidth (dc, bytes, files, nodes, seconds, at) VALUES (?,?,?,?,?,?)",
                (dc, nbytes, files, nodes, seconds, time.time()),
            )

    def runs(self, dc: str, limit: int = RECENT_RUNS) -> list[tuple[int, int, float]]:
        with self._db() as db:
            rows = db.execute(
                "SELECT bytes, files, seconds FROM prewarm_bandwidth WHERE dc=? AND seconds>=? ORDER BY id DESC LIMIT ?",
                (dc, MIN_RUN_SECONDS, limit),
            ).fetchall()
        return [(int(b), int(f), float(s)) for b, f, s in rows]

    def bandwidth(self, dc: str, default_mib_s: float) -> Bandwidth:
        return estimate_bandwidth(self.runs(dc), default_mib_s)

    # -- datasets -------------------------------------------------------------------------------
    def register(self, dataset: str, version: str, dc: str, keys: Iterable[str], manifest_uri: str | None = None) -> int:
        """(Re)register a dataset version as active in dc with these keys; returns the key count."""
        n = 0
        with self._db() as db:
            db.execute("DELETE FROM prewarm_dataset_keys WHERE dataset=? AND version=? AND dc=?", (dataset, version, dc))
            db.execute(
                "INSERT OR REPLACE INTO prewarm_datasets (dataset, version, dc, state, manifest_uri, registered_at) "
                "VALUES (?,?,?,'active',?,?)",
                (dataset, version, dc, manifest_uri, time.time()),
            )
            it = iter(keys)
            while chunk := list(islice(it, _CHUNK)):
                db.executemany(
                    "INSERT OR IGNORE INTO prewarm_dataset_keys VALUES (?,?,?,?)", [(dataset, version, dc, k) for k in chunk]
                )
                n += len(chunk)
        return n

    def retire(self, dataset: str, version: str, dc: str) -> bool:
        with self._db() as db:
            cur = db.execute(
                "UPDATE prewarm_datasets SET state='retired', retired_at=? WHERE dataset=? AND version=? AND dc=?",
                (time.time(), dataset, version, dc),
            )
            return cur.rowcount > 0

    def registrations(self, dc: str | None = None) -> list[Registration]:
        q = (
            "SELECT d.dataset, d.version, d.dc, d.state, d.manifest_uri, "
            "(SELECT COUNT(*) FROM prewarm_dataset_keys k WHERE k.dataset=d.dataset AND k.version=d.version AND k.dc=d.dc) "
            "FROM prewarm_datasets d" + (" WHERE d.dc=?" if dc else "") + " ORDER BY d.dataset, d.version"
        )
        with self._db() as db:
            return [Registration(*r) for r in db.execute(q, (dc,) if dc else ())]

    def users(self, dc: str, keys: Sequence[str], exclude: tuple[str, str] | None = None) -> dict[str, list[str]]:
        """bucket_key -> ["dataset@version", ...] of ACTIVE registrations in dc using it (minus `exclude`)."""
        out: dict[str, list[str]] = {}
        ex_ds, ex_v = exclude or ("", "")
        with self._db() as db:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS q (bucket_key TEXT PRIMARY KEY)")
            db.execute("DELETE FROM q")
            for i in range(0, len(keys), _CHUNK):
                db.executemany("INSERT OR IGNORE INTO q VALUES (?)", [(k,) for k in keys[i : i + _CHUNK]])
            rows = db.execute(
                "SELECT k.bucket_key, k.dataset, k.version FROM q JOIN prewarm_dataset_keys k "
                "ON k.dc=? AND k.bucket_key=q.bucket_key "
                "JOIN prewarm_datasets d ON d.dataset=k.dataset AND d.version=k.version AND d.dc=k.dc "
                "WHERE d.state='active' AND NOT (k.dataset=? AND k.version=?) ORDER BY k.dataset, k.version",
                (dc, ex_ds, ex_v),
            )
            for key, ds, v in rows:
                out.setdefault(key, []).append(f"{ds}@{v}")
            db.execute("DROP TABLE q")
        return out


def estimate_bandwidth(runs: Sequence[tuple[int, int, float]], default_mib_s: float) -> Bandwidth:
    """Fit seconds = bytes / bw + files * c over recent runs (bytes, files, seconds).

    With runs of different file-size mixes a least-squares fit separates bandwidth from per-file
    overhead; otherwise (or if the fit is not physical) keep the default overhead and take the
    median bandwidth of the runs, robust to one odd run.
    """
    if not runs:
        return Bandwidth(default_mib_s * MIB, DEFAULT_PER_FILE_SECONDS, "default")
    src = f"measured ({len(runs)} runs)"
    if len(runs) >= 3:
        fit = _fit(runs)
        if fit is not None:
            return Bandwidth(fit[0], fit[1], src)
    bws = [b / max(s - f * DEFAULT_PER_FILE_SECONDS, 1e-3) for b, f, s in runs if b > 0]
    if not bws:
        return Bandwidth(default_mib_s * MIB, DEFAULT_PER_FILE_SECONDS, "default")
    return Bandwidth(statistics.median(bws), DEFAULT_PER_FILE_SECONDS, src)


def _fit(runs: Sequence[tuple[int, int, float]]) -> tuple[float, float] | None:
    # Normal equations for s = a*b + c*f (no intercept): a = 1/bandwidth, c = per-file overhead.
    sbb = sum(b * b for b, _, _ in runs)
    sff = sum(f * f for _, f, _ in runs)
    sbf = sum(b * f for b, f, _ in runs)
    sbs = sum(b * s for b, _, s in runs)
    sfs = sum(f * s for _, f, s in runs)
    det = sbb * sff - sbf * sbf
    if det <= 1e-9 * sbb * sff:  # same file-size mix in every run: a and c can't be told apart
        return None
    a = (sbs * sff - sfs * sbf) / det
    c = (sfs * sbb - sbs * sbf) / det
    if a <= 0 or c < 0:
        return None
    return 1 / a, c
