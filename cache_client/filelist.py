"""Streaming readers for dataset file lists (txt, csv, parquet, pkl).

A released dataset names its files in a list that may hold tens of millions of keys, so the
readers yield one entry at a time and never hold the list. Each entry's key is validated and
normalised to "bucket/key" (cache_client.keys.validate_key). A line that cannot be used is
counted in `FileList.stats.unreadable` with its line number and the rest of the list proceeds;
a file that cannot be read at all raises FileListError.

Line numbers: txt and csv give the physical line (1-based), parquet the row number (1-based),
pkl the position in the list (1-based).

Memory: duplicates are found with an open-addressing table of 64-bit hashes held in an
array('Q') (8 bytes a slot, load factor <= 0.7, so about 12-23 bytes a distinct key: ~230 MB
at 10 million keys), not a set of strings. Two distinct keys share a 64-bit hash with
probability about n**2 / 2**65 (~3e-6 at 10 million keys); the later one would then be
dropped as a duplicate.
"""
from __future__ import annotations

import csv
import io
import os
import pickle
import stat
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdc.errors import BadKey, FileListError

from cache_client.keys import validate_key

MAX_REASONS = 1000  # unreadable lines kept with their reason; all are counted
FORMATS = ("txt", "csv", "parquet", "pkl")
_EXTENSIONS = {
    ".txt": "txt", ".lst": "txt", ".list": "txt",
    ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
    ".pkl": "pkl", ".pickle": "pkl",
}
_KEY_COLUMNS = ("key", "path")
_PARQUET_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class ListEntry:
    key: str  # "bucket/key"
    size: int | None
    line: int


@dataclass
class ListStats:
    entries: int = 0  # entries yielded (after dedupe)
    duplicates: int = 0
    blank: int = 0  # blank lines and comments (txt), empty rows (csv)
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # first MAX_REASONS
    unreadable_count: int = 0

    def add_unreadable(self, line: int, reason: str) -> None:
        self.unreadable_count += 1
        if len(self.unreadable) < MAX_REASONS:
            self.unreadable.append((line, reason))


class _HashSet:
    """A set of non-zero 64-bit ints in one flat array: linear probing, 0 marks an empty slot."""

    __slots__ = ("_table", "_mask", "_n", "_limit")

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._table = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._n = 0
        self._limit = capacity * 7 // 10

    def __len__(self) -> int:
        return self._n

    def add(self, h: int) -> bool:
        """Add `h`; True if it was not there."""
        t = self._table
        mask = self._mask
        i = h & mask
        while True:
            v = t[i]
            if v == 0:
                t[i] = h
                self._n += 1
                if self._n > self._limit:
                    self._grow()
                return True
            if v == h:
                return False
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._table
        capacity = 2 * len(old)
        self._table = t = array("Q", bytes(8 * capacity))
        self._mask = mask = capacity - 1
        self._limit = capacity * 7 // 10
        for h in old:
            if h:
                i = h & mask
                while t[i]:
                    i = (i + 1) & mask
                t[i] = h


def _key_hash(key: str) -> int:
    # Python's str hash is a keyed 64-bit SipHash: fine for dedupe inside one process (never
    # stored or compared across processes) and computed in C, unlike a hashlib digest.
    h = hash(key) & 0xFFFF_FFFF_FFFF_FFFF
    return h or 1


def detect_format(path: str | Path, fmt: str | None = None) -> str:
    if fmt is not None:
        f = fmt.lower().lstrip(".")
        f = {"parq": "parquet", "pickle": "pkl", "text": "txt"}.get(f, f)
        if f not in FORMATS:
            raise FileListError(f"unknown file-list format {fmt!r} (known: {', '.join(FORMATS)})")
        return f
    suffix = Path(path).suffix.lower()
    try:
        return _EXTENSIONS[suffix]
    except KeyError:
        raise FileListError(
            f"{path}: cannot tell the file-list format from the extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(sorted(_EXTENSIONS))} or pass fmt= ({', '.join(FORMATS)})"
        ) from None


class FileList:
    """An iterable of ListEntry read lazily from a file; `stats` is complete after a full pass.

    Each iteration re-reads the file and starts fresh stats.
    """

    def __init__(self, path: str | Path, fmt: str, *, dedupe: bool = True) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.dedupe = dedupe
        self.stats = ListStats()
        self.complete = False  # True once an iteration ran to the end

    def __repr__(self) -> str:
        return f"FileList({str(self.path)!r}, fmt={self.fmt!r}, dedupe={self.dedupe})"

    def __iter__(self) -> Iterator[ListEntry]:
        self.stats = stats = ListStats()
        self.complete = False
        seen = _HashSet() if self.dedupe else None
        raw = {"txt": _read_txt, "csv": _read_csv, "parquet": _read_parquet, "pkl": _read_pkl}[self.fmt]
        for line, key, size in raw(self.path, stats):
            try:
                key = validate_key(key)
            except BadKey as exc:
                stats.add_unreadable(line, f"bad key: {exc}")
                continue
            if seen is not None and not seen.add(_key_hash(key)):
                stats.duplicates += 1
                continue
            stats.entries += 1
            yield ListEntry(key, size, line)
        self.complete = True


def read_file_list(path: str | Path, *, fmt: str | None = None, dedupe: bool = True) -> FileList:
    """Open a file list for streaming. Format from `fmt` or the file extension.

    Checks now that the file exists and, for a regular csv or parquet file, that its header
    names a key column, so a wrong list fails before any work starts.
    """
    f = detect_format(path, fmt)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileListError(f"file list not found: {p}") from None
    except OSError as exc:
        raise FileListError(f"file list {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileListError(f"file list {p} is a directory")
    if not os.access(p, os.R_OK):
        raise FileListError(f"file list {p}: permission denied")
    # Headers are checked only on regular files: opening a FIFO twice would lose its data.
    if stat.S_ISREG(st.st_mode):
        if f == "csv":
            with _open_text(p) as fh:
                try:
                    header = next(csv.reader(fh), None)
                except csv.Error as exc:
                    raise FileListError(f"csv file list {p}: bad header: {exc}") from None
                _csv_columns(p, header)
        elif f == "parquet":
            _parquet_columns(p, _open_parquet(p))
    return FileList(p, f, dedupe=dedupe)


# -- raw readers: yield (line, key as found, size); FileList validates and dedupes -------------

_Raw = Iterator[tuple[int, Any, "int | None"]]


def _open_binary(path: Path) -> io.BufferedReader:
    try:
        return open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the caller's with
    except OSError as exc:
        raise FileListError(f"cannot open file list {path}: {exc.strerror or exc}") from None


def _open_text(path: Path) -> io.TextIOWrapper:
    # Undecodable bytes become lone surrogates, which validate_key refuses as not_utf8: one bad
    # line must not stop the list. utf-8-sig drops a BOM some tools write.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _read_txt(path: Path, stats: ListStats) -> _Raw:
    with _open_binary(path) as fh:
        for n, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.add_unreadable(n, "not utf-8")
                continue
            if n == 1:
                text = text.removeprefix("\ufeff")
            # Surrounding whitespace is taken as formatting, not part of the key.
            text = text.strip()
            if not text or text[0] == "#":
                stats.blank += 1
                continue
            yield n, text, None


def _csv_columns(path: Path, header: list[str] | None) -> tuple[int, int | None]:
    if header is None:
        raise FileListError(f"csv file list {path} is empty (expected a header with a key or path column)")
    names = [h.strip().lower() for h in header]
    key_col = next((names.index(c) for c in _KEY_COLUMNS if c in names), None)
    if key_col is None:
        raise FileListError(f"csv file list {path}: no 'key' or 'path' column in header {header!r}")
    size_col = names.index("size") if "size" in names else None
    return key_col, size_col


def _parse_size(value: Any) -> int | None:
    """None for an empty size; ValueError for anything but a non-negative integer."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str):
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def _read_csv(path: Path, stats: ListStats) -> _Raw:
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise FileListError(f"csv file list {path}: bad header: {exc}") from None
        key_col, size_col = _csv_columns(path, header)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                # The reader has consumed the bad line and goes on with the next one.
                stats.add_unreadable(reader.line_num, f"csv: {exc}")
                continue
            n = reader.line_num
            if not row or all(not c.strip() for c in row):
                stats.blank += 1
                continue
            if key_col >= len(row):
                stats.add_unreadable(n, f"row has {len(row)} fields, key is field {key_col + 1}")
                continue
            size = None
            if size_col is not None and size_col < len(row):
                try:
                    size = _parse_size(row[size_col])
                except ValueError:
                    stats.add_unreadable(n, f"bad size {row[size_col][:40]!r}")
                    continue
            yield n, row[key_col].strip(), size


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq  # only for parquet lists

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise FileListError(f"parquet file list {path} cannot be read: {exc}") from None


def _parquet_columns(path: Path, pf: Any) -> tuple[str, str | None]:
    import pyarrow as pa

    schema = pf.schema_arrow
    by_lower = {name.lower(): name for name in schema.names}
    key_col = next((by_lower[c] for c in _KEY_COLUMNS if c in by_lower), None)
    if key_col is None:
        raise FileListError(f"parquet file list {path}: no 'key' or 'path' column in {schema.names}")
    kt = schema.field(key_col).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16
    if not (pa.types.is_string(kt) or pa.types.is_large_string(kt) or is_view(kt)):
        raise FileListError(f"parquet file list {path}: column {key_col!r} is {kt}, expected strings")
    size_col = by_lower.get("size")
    if size_col is not None and not pa.types.is_integer(schema.field(size_col).type):
        raise FileListError(
            f"parquet file list {path}: column {size_col!r} is {schema.field(size_col).type}, expected integers"
        )
    return key_col, size_col


def _read_parquet(path: Path, stats: ListStats) -> _Raw:
    pf = _open_parquet(path)
    key_col, size_col = _parquet_columns(path, pf)
    columns = [key_col] + ([size_col] if size_col else [])
    n = 0
    try:
        # Record batches keep memory bounded by the batch, not the file.
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            keys = batch.column(0).to_pylist()
            sizes = batch.column(1).to_pylist() if size_col else [None] * len(keys)
            for key, size in zip(keys, sizes):
                n += 1
                if key is None:
                    stats.add_unreadable(n, "null key")
                    continue
                if size is not None and size < 0:
                    stats.add_unreadable(n, f"negative size {size}")
                    continue
                yield n, key, size
    except FileListError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt row group: rows can't be skipped singly
        raise FileListError(f"parquet file list {path}: unreadable after row {n}: {exc}") from None
    finally:
        pf.close()


class _ListUnpickler(pickle.Unpickler):
    """Only plain containers: pickle runs code from the globals it names, so allow none else.

    Even so, read only lists from trusted writers.
    """

    _ALLOWED = {("builtins", "list"), ("builtins", "dict"), ("builtins", "str"), ("builtins", "int")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a file list")


def _read_pkl(path: Path, stats: ListStats) -> _Raw:
    # Pickle cannot stream: the whole list is loaded here (about 100 bytes a key in memory).
    # Prefer txt, csv or parquet for large lists.
    with _open_binary(path) as fh:
        try:
            data = _ListUnpickler(fh).load()
        except Exception as exc:  # noqa: BLE001 - unpickling raises many types on bad input
            raise FileListError(f"pkl file list {path} cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, list):
        raise FileListError(f"pkl file list {path}: expected a list of str or dict, got {type(data).__name__}")
    for n, item in enumerate(data, 1):
        if isinstance(item, str):
            yield n, item, None
        elif isinstance(item, dict):
            key = item.get("path", item.get("key"))
            if not isinstance(key, str):
                stats.add_unreadable(n, "dict without a str 'path' or 'key'")
                continue
            try:
                size = _parse_size(item.get("size"))
            except ValueError:
                stats.add_unreadable(n, f"bad size {item.get('size')!r:.40}")
                continue
            yield n, key, size
        else:
            stats.add_unreadable(n, f"expected str or dict, got {type(item).__name__}")
