"""The SQLite catalog: one transaction per batch, the sequencer guard, the outbox."""
from __future__ import annotations

from pathlib import Path

from mirror.catalog import CatalogEntry, Outgoing, SqliteCatalog


def _e(key: str, seq: str, *, deleted: bool = False) -> CatalogEntry:
    return CatalogEntry("b", key, 1, "e", seq, deleted, 1.0, 2.0, "r", "metadata", "A", "s", key, "e")


def _outbox(applied: list[CatalogEntry]) -> list[Outgoing]:
    return [Outgoing("applied", None, e.key.encode()) for e in applied]


def test_guard_keeps_newer_rows_and_outbox_only_holds_what_was_applied(tmp_path: Path) -> None:
    cat = SqliteCatalog(tmp_path / "c.db")
    assert cat.commit_batch([_e("k1", "2")], _outbox, {("g", "t", 0): 5}) == [_e("k1", "2")]
    # another mirror already wrote k1 at sequencer 2: our older k1 must not win, nor be announced
    applied = cat.commit_batch([_e("k1", "1"), _e("k2", "1")], _outbox, {("g", "t", 0): 3})
    assert [e.key for e in applied] == ["k2"]
    assert cat.get("b", "k1").sequencer == "2"  # type: ignore[union-attr]
    assert [o.value for _, o in cat.pending_outbox()] == [b"k1", b"k2"]
    assert cat.offsets("g") == {("t", 0): 5}  # offsets never move backwards


def test_tombstone_blocks_an_older_put(tmp_path: Path) -> None:
    cat = SqliteCatalog(tmp_path / "c.db")
    cat.commit_batch([_e("k", "5", deleted=True)], _outbox, {})
    assert cat.commit_batch([_e("k", "4")], _outbox, {}) == []
    assert cat.get("b", "k").deleted  # type: ignore[union-attr]
    assert cat.live_objects() == []
