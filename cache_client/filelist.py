"""Streaming readers for dataset file lists and dataset indexes.

A released dataset names its files either in a plain list (txt, csv, parquet, a pkl list) or in
the index its training framework loads: mmdetection3d info pkls (v1 `infos`, v2 `data_list`),
COCO JSON, nuScenes `sample_data.json`, JSON Lines, Parquet/CSV with one column per sensor
(list columns included). `read_file_list` opens any of them; iterating yields one `ListEntry`
per file, each key validated and normalised to "bucket/key" (cache_client.keys.validate_key).

- Which strings are paths: `select=` (a JMESPath expression for pkl/JSON/JSON Lines, column
  names "a,b" for csv/parquet), else the detected shape's selector (cache_client.selectors).
  The selector used is logged and kept on the FileList (`selector`, `shape`).
- Relative paths: `root=` ("s3://bucket/prefix", or {"": base, TAG: prefix} per modality).
- A line or value that cannot be used is counted in `stats.unreadable` with its line (txt, csv,
  JSON Lines: physical line; parquet: row; pkl/JSON: record in the array, or position in the
  selection) and the rest proceeds; a file that cannot be read at all, a selector that matches
  nothing, or a refused pickle raises FileListError.

Memory bounds (what a hostile or broken file can make us hold):
- txt, csv, JSON Lines, parquet: streamed in chunks (1 MiB, or 65,536 parquet rows); a line
  longer than MAX_LINE_BYTES is unreadable, not loaded.
- JSON: streamed record by record when the selector is `KEY[].EXPR` / `[].EXPR` (every known
  shape is); one record above jsonstream.MAX_ELEMENT_CHARS (16 Mi characters) is refused. Other
  selectors load the document, refused above `max_document_bytes` (default 1 GiB).
- pkl: pickle cannot stream; the file is refused above `max_document_bytes` and loaded with
  cache_client.safe_pickle, which drops numeric array values (measured: peak RSS 1.4x the file
  for mmdet3d v1 infos, 83 MiB for a 58 MiB pkl of 6,000 samples).
- dedupe: a table of 64-bit hashes (numpy, sized from the file, load <= 0.7: 11-23 bytes a
  distinct key, 128 MiB at 10 million keys), not a set of strings. Two distinct keys share a
  64-bit hash with probability about n**2 / 2**65 (~3e-6 at 10 million keys); the later one
  would be dropped as a duplicate.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import compress, repeat
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from cache_client import jsonstream, safe_pickle
from xdc.keys import all_valid
from xdc.keys import check_bucket_key as validate_key
from cache_client.selectors import (
    PATH_FIELDS,
    Roots,
    Selector,
    Shape,
    compile_selector,
    describe_top,
    detect_document,
    detect_record,
    flatten,
)
from xdc.errors import BadKey, FileListError

log = logging.getLogger("xdc.filelist")

MAX_REASONS = 1000  # unreadable lines kept with their reason; all are counted
MAX_LINE_BYTES = 1 << 20  # a longer line (txt, JSON Lines) is unreadable
MAX_DOCUMENT_BYTES = 1 << 30  # pkl, and JSON with a selector that needs the whole document
FORMATS = ("txt", "csv", "parquet", "pkl", "json", "jsonl")
_EXTENSIONS = {
    ".txt": "txt", ".lst": "txt", ".list": "txt",
    ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
    ".pkl": "pkl", ".pickle": "pkl",
    ".json": "json",
    ".jsonl": "jsonl", ".ndjson": "jsonl",
}
_KEY_COLUMNS = ("key", "path")
_PARQUET_BATCH_ROWS = 65_536
_READ_CHUNK = 1 << 20
_DOC_BATCH = 4096  # selected paths handed on together (documents)
_NEWLINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)")


class ListEntry(NamedTuple):
    key: str  # "bucket/key"
    size: int | None
    line: int


@dataclass
class ListStats:
    entries: int = 0  # entries yielded (after dedupe)
    duplicates: int = 0
    blank: int = 0  # blank lines and comments (txt), empty rows (csv), empty lines (JSON Lines)
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # first MAX_REASONS
    unreadable_count: int = 0
    records: int = 0  # records read (pkl, JSON, JSON Lines)
    selected: int = 0  # values the selector gave (documents), before validation

    def add_unreadable(self, line: int, reason: str) -> None:
        self.unreadable_count += 1
        if len(self.unreadable) < MAX_REASONS:
            self.unreadable.append((line, reason))


@dataclass
class EntryBatch:
    """Entries read together (parallel lists): what bulk consumers use instead of ListEntry."""

    keys: list[str]
    sizes: list[int | None]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.keys)


class _HashSet:
    """A set of non-zero 64-bit ints in one flat numpy array: linear probing, 0 marks an empty
    slot, inserted a batch at a time with vector operations."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._table = np.zeros(capacity, dtype=np.uint64)
        self._n = 0

    @classmethod
    def for_about(cls, entries: int) -> _HashSet:
        """Sized for about `entries` (growing re-inserts everything: a good guess saves that);
        from 65,536 to 16 Mi slots (128 MiB)."""
        slots = 1 << 16
        while slots * 7 < entries * 10 and slots < 1 << 24:
            slots *= 2
        return cls(slots)

    def __len__(self) -> int:
        return self._n

    def add(self, h: int) -> bool:
        """Add one value; True if it was not there."""
        return bool(self.add_batch(np.array([h], dtype=np.uint64))[0])

    def add_batch(self, hashes: np.ndarray) -> np.ndarray:
        """Add a batch (uint64, non-zero); a bool per element: True for the first occurrence of
        a value that was not in the set."""
        uniq, first = np.unique(hashes, return_index=True)
        while (self._n + len(uniq)) * 10 > len(self._table) * 7:
            self._grow()
        fresh = self._insert(uniq)
        out = np.zeros(len(hashes), dtype=bool)
        out[first[fresh]] = True
        return out

    def _insert(self, values: np.ndarray) -> np.ndarray:
        """Insert distinct values; True where a value was new."""
        table = self._table
        mask = np.uint64(len(table) - 1)
        fresh = np.zeros(len(values), dtype=bool)
        todo = np.arange(len(values))
        slots = values & mask
        while len(todo):
            cur = table[slots]
            vals = values[todo]
            empty = np.flatnonzero(cur == 0)
            # Distinct values racing for one empty slot: one write lands, read back to see which.
            table[slots[empty]] = vals[empty]
            won = empty[table[slots[empty]] == vals[empty]]
            fresh[todo[won]] = True
            self._n += len(won)
            done = cur == vals
            done[won] = True
            keep = ~done
            todo = todo[keep]
            slots = (slots[keep] + np.uint64(1)) & mask
        return fresh

    def _grow(self) -> None:
        old = self._table[self._table != 0]
        self._table = np.zeros(2 * len(self._table), dtype=np.uint64)
        self._n = 0
        self._insert(old)


def _key_hashes(keys: list[str]) -> np.ndarray:
    # Python's str hash is a keyed 64-bit SipHash: fine for dedupe inside one process (never
    # stored or compared across processes) and computed in C, unlike a hashlib digest.
    h = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)).view(np.uint64)
    h[h == 0] = 1
    return h


def detect_format(path: str | Path, fmt: str | None = None) -> str:
    if fmt is not None:
        f = fmt.lower().lstrip(".")
        f = {"parq": "parquet", "pickle": "pkl", "text": "txt", "ndjson": "jsonl"}.get(f, f)
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

    Each iteration re-reads the file and starts fresh stats. `shape` and `selector` say how the
    paths were picked (known once the file was opened, or for a FIFO once iteration began).
    """

    def __init__(self, path: str | Path, fmt: str, *, dedupe: bool = True, select: str | None = None,
                 root: str | Mapping[str, str] | None = None, max_document_bytes: int = MAX_DOCUMENT_BYTES) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.dedupe = dedupe
        self.select = select
        self.roots = Roots(root)
        self.max_document_bytes = max_document_bytes
        self.stats = ListStats()
        self.complete = False  # True once an iteration ran to the end
        self.shape: str | None = None
        self.selector: str | None = None
        self._doc: Any = None  # a pkl loaded while opening, kept for the first iteration
        self._have_doc = False
        self._top = ""  # what the document looks like, for a "matched nothing" error

    def __repr__(self) -> str:
        return f"FileList({str(self.path)!r}, fmt={self.fmt!r}, dedupe={self.dedupe}, selector={self.selector!r})"

    def describe(self) -> dict[str, Any]:
        """How paths are picked from this list: for reports and logs."""
        return {"path": str(self.path), "format": self.fmt, "shape": self.shape, "selector": self.selector,
                "root": self.roots.describe() or None}

    def _announce(self, shape: str, selector: str) -> None:
        if (self.shape, self.selector) != (shape, selector):
            self.shape, self.selector = shape, selector
            root = f", root {self.roots.describe()}" if self.roots else ""
            log.info("file list %s: %s, selector %r%s (change with --select / --root)", self.path, shape, selector, root)

    def __iter__(self) -> Iterator[ListEntry]:
        for b in self.iter_batches():
            yield from map(ListEntry._make, zip(b.keys, b.sizes, b.lines))

    def iter_batches(self) -> Iterator[EntryBatch]:
        """The entries in batches (a chunk of the file each): the fast path for large lists."""
        self.stats = stats = ListStats()
        self.complete = False
        seen = _HashSet.for_about(self.estimate_entries()) if self.dedupe else None
        raw = {"txt": self._raw_txt, "csv": self._raw_csv, "parquet": self._raw_parquet, "pkl": self._raw_pkl,
               "json": self._raw_json, "jsonl": self._raw_jsonl}[self.fmt]
        mark = 0
        for lines, paths, tags, sizes in raw(stats):
            b = self._finish(lines, paths, tags, sizes, stats, seen)
            if len(stats.unreadable) > mark + 1:
                # reasons of one batch come from two stages: keep them in line order
                stats.unreadable[mark:] = sorted(stats.unreadable[mark:], key=lambda r: r[0])
            mark = len(stats.unreadable)
            if b.keys:
                yield b
        if self.fmt in ("pkl", "json", "jsonl") and stats.selected == 0:
            self._matched_nothing(stats)
        self.complete = True

    def _finish(self, lines: list[int], paths: list[Any], tags: list[str | None] | None,
                sizes: list[int | None] | None, stats: ListStats, seen: _HashSet | None) -> EntryBatch:
        """Root join, validation and dedupe of one raw batch."""
        roots = self.roots if self.roots else None
        if roots is None and all_valid(paths):  # the common case: no call a key
            keys, out_lines = paths, lines
            out_sizes = sizes if sizes is not None else [None] * len(paths)
        else:
            keys, out_lines, out_sizes = self._validate(lines, paths, tags, sizes, stats, roots)
        if seen is not None and keys:
            fresh = seen.add_batch(_key_hashes(keys))
            dup = len(keys) - int(fresh.sum())
            if dup:
                stats.duplicates += dup
                sel = fresh.tolist()
                keys = list(compress(keys, sel))
                out_lines = list(compress(out_lines, sel))
                out_sizes = list(compress(out_sizes, sel))
        stats.entries += len(keys)
        return EntryBatch(keys, out_sizes, out_lines)

    def estimate_entries(self) -> int:
        """A guess at the number of entries, to size the dedupe table."""
        try:
            st = self.path.stat()
        except OSError:
            return 0
        if not stat.S_ISREG(st.st_mode):
            return 0
        if self.fmt == "parquet":
            try:
                pf = _open_parquet(self.path)
                try:
                    return int(pf.metadata.num_rows) * max(1, len((self.select or "k").split(",")))
                finally:
                    pf.close()
            except FileListError:
                return 0
        per_entry = {"txt": 48, "csv": 64, "jsonl": 96}.get(self.fmt, 256)  # bytes an entry, roughly
        return st.st_size // per_entry

    @staticmethod
    def _validate(lines: list[int], paths: list[Any], tags: list[str | None] | None, sizes: list[int | None] | None,
                  stats: ListStats, roots: Roots | None) -> tuple[list[str], list[int], list[int | None]]:
        keys: list[str] = []
        out_lines: list[int] = []
        out_sizes: list[int | None] = []
        for i, (n, p) in enumerate(zip(lines, paths)):
            try:
                if roots is not None:
                    p = roots.join(p, tags[i] if tags else None)
                k = validate_key(p)
            except BadKey as exc:
                stats.add_unreadable(n, f"bad key: {exc}")
                continue
            except ValueError as exc:
                stats.add_unreadable(n, str(exc))
                continue
            keys.append(k)
            out_lines.append(n)
            out_sizes.append(sizes[i] if sizes is not None else None)
        return keys, out_lines, out_sizes

    def _matched_nothing(self, stats: ListStats) -> None:
        what = f"selector {self.selector!r}" if self.selector else "the list"
        raise FileListError(
            f"{self.path}: {what} matched nothing ({stats.records:,} records read); "
            f"{self._top_description()}; pass select= (JMESPath) to say where the paths are"
        )

    def _top_description(self) -> str:
        if self._top:
            return self._top
        if self.fmt == "json":
            try:
                p = jsonstream.peek(self.path)
                return describe_top(p.keys, p.first)
            except (FileListError, OSError):
                pass
        return "no path found"

    # -- opening ---------------------------------------------------------------------------------
    def _open_checks(self) -> None:
        """Early checks on a regular file, so a wrong list fails before any work starts."""
        if self.fmt == "csv":
            with _open_text(self.path) as fh:
                try:
                    header = next(csv.reader(fh), None)
                except csv.Error as exc:
                    raise FileListError(f"csv file list {self.path}: bad header: {exc}") from None
                cols, _ = _csv_columns(self.path, header, self.select)
                self._announce("csv", ",".join(header[c].strip() for c in cols))  # type: ignore[index]
        elif self.fmt == "parquet":
            pf = _open_parquet(self.path)
            try:
                self._announce("parquet", ",".join(_parquet_columns(self.path, pf, self.select)[0]))
            finally:
                pf.close()
        elif self.fmt == "pkl":
            self._doc = _load_pkl(self.path, self.max_document_bytes)
            self._have_doc = True
            self._doc_selector(self._doc)
        elif self.fmt == "json":
            self._json_selector()
        elif self.fmt == "jsonl" and self.select is None:
            self._jsonl_first_shape()

    # -- raw readers: yield (lines, paths, tags or None, sizes or None) per batch ----------------
    def _raw_txt(self, stats: ListStats) -> Iterator[tuple[list[int], list[Any], None, None]]:
        n = 0
        for chunk_lines in _line_chunks(self.path, stats):
            if n == 0 and isinstance(chunk_lines[0], str):
                chunk_lines[0] = chunk_lines[0].removeprefix("\ufeff")
            if chunk_lines and isinstance(chunk_lines[0], str) and isinstance(chunk_lines[-1], str):
                # Surrounding whitespace is formatting, not part of the key.
                stripped = list(map(str.strip, chunk_lines))
                if all(stripped) and not any(map(str.startswith, stripped, repeat("#"))):  # no blank or comment line
                    yield list(range(n + 1, n + 1 + len(stripped))), stripped, None, None
                    n += len(stripped)
                    continue
            lines: list[int] = []
            paths: list[Any] = []
            for raw in chunk_lines:
                n += 1
                if raw is None:
                    continue  # too long: counted by _line_chunks
                if isinstance(raw, str):
                    text = raw
                else:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        stats.add_unreadable(n, "not utf-8")
                        continue
                if n == 1:
                    text = text.removeprefix("\ufeff")
                text = text.strip()
                if not text or text[0] == "#":
                    stats.blank += 1
                    continue
                lines.append(n)
                paths.append(text)
            yield lines, paths, None, None

    def _raw_csv(self, stats: ListStats) -> Iterator[tuple[list[int], list[Any], list[str | None] | None, list[int | None] | None]]:
        with _open_binary(self.path) as fh:
            src = _Lines(fh)
            reader = csv.reader(src)
            try:
                header = next(reader, None)
            except csv.Error as exc:
                raise FileListError(f"csv file list {self.path}: bad header: {exc}") from None
            cols, size_col = _csv_columns(self.path, header, self.select)
            names = [header[c].strip() for c in cols] if header else []  # type: ignore[index]
            self._announce("csv", ",".join(names))
            idx = cols
            multi = len(idx) > 1
            lines: list[int] = []
            paths: list[Any] = []
            tags: list[str | None] = []
            sizes: list[int | None] = []
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    # The reader has consumed the bad line and goes on with the next one.
                    stats.add_unreadable(reader.line_num, f"csv: {exc}")
                    continue
                n = reader.line_num
                if not row or all(not c.strip() for c in row):
                    stats.blank += 1
                elif max(idx) >= len(row):
                    stats.add_unreadable(n, f"row has {len(row)} fields, key is field {max(idx) + 1}")
                else:
                    size = None
                    bad = False
                    if size_col is not None and size_col < len(row):
                        try:
                            size = _parse_size(row[size_col])
                        except ValueError:
                            stats.add_unreadable(n, f"bad size {row[size_col][:40]!r}")
                            bad = True
                    if not bad:
                        found = 0
                        for c, name in zip(idx, names):
                            for p in _cell_paths(row[c], stats, n):
                                lines.append(n)
                                paths.append(p)
                                tags.append(name if multi else None)
                                sizes.append(size)
                                found += 1
                        if found > 1 and size is not None:
                            for j in range(len(sizes) - found, len(sizes)):
                                sizes[j] = None  # one size for several files says nothing
                        if not found:
                            stats.blank += 1
                if len(lines) >= 4096 or (lines and not src.buffered()):
                    yield lines, paths, tags if multi else None, sizes
                    lines, paths, tags, sizes = [], [], [], []
            if lines:
                yield lines, paths, tags if multi else None, sizes

    def _raw_parquet(self, stats: ListStats) -> Iterator[tuple[list[int], list[Any], list[str | None] | None, list[int | None] | None]]:
        import pyarrow as pa
        import pyarrow.compute as pc

        pf = _open_parquet(self.path)
        try:
            cols, size_col = _parquet_columns(self.path, pf, self.select)
            self._announce("parquet", ",".join(cols))
            multi = len(cols) > 1
            n = 0
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=cols + ([size_col] if size_col else [])):
                if not multi and batch.column(0).null_count == 0 and pa.types.is_string(batch.column(0).type) and (
                        size_col is None or int(pc.min(batch.column(1)).as_py() or 0) >= 0):
                    # one string column, no nulls, no negative size: whole columns at once
                    paths = batch.column(0).to_pylist()
                    sizes_col = batch.column(1).to_pylist() if size_col else None
                    yield list(range(n + 1, n + 1 + len(paths))), paths, None, sizes_col
                    n += batch.num_rows
                    continue
                columns = [batch.column(i).to_pylist() for i in range(len(cols))]
                row_sizes = batch.column(len(cols)).to_pylist() if size_col else None
                lines: list[int] = []
                paths: list[Any] = []
                tags: list[str | None] = []
                sizes: list[int | None] = []
                start = n
                for j in range(batch.num_rows):
                    n = start + j + 1
                    size = row_sizes[j] if row_sizes is not None else None
                    if size is not None and size < 0:
                        stats.add_unreadable(n, f"negative size {size}")
                        continue
                    found = 0
                    for name, column in zip(cols, columns):
                        v = column[j]
                        if v is None:
                            continue
                        for p in (v if isinstance(v, list) else (v,)):
                            if p is None:
                                continue
                            lines.append(n)
                            paths.append(p)
                            tags.append(name if multi else None)
                            sizes.append(size)
                            found += 1
                    if found == 0:
                        stats.add_unreadable(n, "null key")
                    elif found > 1 and size is not None:
                        for k in range(len(sizes) - found, len(sizes)):
                            sizes[k] = None
                n = start + batch.num_rows
                yield lines, paths, tags if multi else None, sizes
        except FileListError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt row group: rows can't be skipped singly
            raise FileListError(f"parquet file list {self.path}: unreadable after row {n}: {exc}") from None
        finally:
            pf.close()

    def _raw_pkl(self, stats: ListStats) -> Iterator[tuple[list[int], list[Any], list[str | None] | None, list[int | None] | None]]:
        if self._have_doc:
            doc, self._doc, self._have_doc = self._doc, None, False
        else:
            doc = _load_pkl(self.path, self.max_document_bytes)
        self._top = _describe_doc(doc)
        sel, shape = self._doc_selector(doc)
        size = os.path.getsize(self.path) if self.path.is_file() else 1 << 40
        yield from self._select_in_memory(doc, sel, shape, stats, size)

    def _raw_json(self, stats: ListStats) -> Iterator[tuple[list[int], list[Any], list[str | None] | None, list[int | None] | None]]:
        sel, shape = self._json_selector()
        size = os.path.getsize(self.path) if self.path.is_file() else 1 << 40
        if sel.array is None:
            doc = jsonstream.load_document(self.path, self.max_document_bytes)
            yield from self._select_in_memory(doc, sel, shape, stats, size)
            return
        records = jsonstream.iter_array(self.path, sel.array or None)
        yield from self._select_records(records, sel, shape, stats, size)

    def _raw_jsonl(self, stats: ListStats) -> Iterator[tuple[list[int], list[Any], list[str | None] | None, list[int | None] | None]]:
        sel: Selector | None = compile_selector(self.select) if self.select is not None else None
        shape: Shape | None = None
        if sel is not None:
            self._announce("custom", sel.expression)
        budget = [1 << 62]
        n = 0
        for chunk_lines in _line_chunks(self.path, stats):
            out: tuple[list[int], list[Any], list[str | None], list[int | None]] = ([], [], [], [])
            for raw in chunk_lines:
                n += 1
                if raw is None:
                    continue
                if not raw.strip():
                    stats.blank += 1
                    continue
                try:
                    rec = json.loads(raw)
                except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
                    stats.add_unreadable(n, f"invalid JSON: {str(exc)[:80]}" if not isinstance(exc, RecursionError)
                                         else "JSON nested too deeply")
                    continue
                stats.records += 1
                if sel is None and shape is None:  # the first record decides the shape
                    self._top = f"records like {_describe_doc([rec])}"
                    shape = detect_record(rec)
                    if shape is None:
                        raise FileListError(
                            f"{self.path}: line {n}: cannot tell which strings are paths in a record with keys "
                            f"{sorted(rec)[:12] if isinstance(rec, dict) else type(rec).__name__}; "
                            "pass select= (JMESPath, per line)")
                    self._check_root(shape)
                    self._announce(shape.name, _shape_selector_text(shape))
                    if shape.name != "paths":
                        sel = compile_selector(shape.selector, shape.name)
                if sel is None:
                    assert shape is not None
                    self._path_record(rec, n, stats, out)
                else:
                    self._emit(sel.on_document(rec), n, stats, out, budget)
            yield out[0], out[1], out[2], out[3]

    # -- documents -------------------------------------------------------------------------------
    def _doc_selector(self, doc: Any) -> tuple[Selector, Shape | None]:
        """The selector (a user's, or a detected shape's) and the shape (None for a user's)."""
        if self.select is not None:
            sel = compile_selector(self.select)
            self._announce("custom", sel.expression)
            return sel, None
        if isinstance(doc, tuple):
            doc = list(doc)
        if isinstance(doc, list):
            shape = detect_document("array", [], {"": doc[0]} if doc else {})
            if shape is None and not doc:
                raise FileListError(f"{self.path}: the list is empty")
        elif isinstance(doc, dict):
            keys = [k for k in doc if isinstance(k, str)]
            first = {k: v[0] for k, v in doc.items() if isinstance(k, str) and isinstance(v, list) and v}
            shape = detect_document("object", keys, first)
        else:
            shape = None
        if shape is None:
            raise FileListError(f"{self.path}: cannot tell which strings are file paths in {_describe_doc(doc)}; "
                                "pass select= (a JMESPath expression such as 'infos[].lidar_path')")
        self._check_root(shape)
        self._announce(shape.name, _shape_selector_text(shape))
        return compile_selector(shape.selector, shape.name), shape

    def _json_selector(self) -> tuple[Selector, Shape | None]:
        if self.select is not None:
            sel = compile_selector(self.select)
            self._announce("custom", sel.expression)
            return sel, None
        p = jsonstream.peek(self.path, stop_at=frozenset({"infos", "data_list", "images", "files", "paths", "keys", "samples"}))
        shape = detect_document(p.kind, p.keys, p.first)
        if shape is None:
            if p.kind == "array" and not p.first:
                raise FileListError(f"{self.path}: the list is empty")
            raise FileListError(f"{self.path}: cannot tell which strings are file paths in "
                                f"{describe_top(p.keys, p.first)}; pass select= (a JMESPath expression such as "
                                "'images[].file_name')")
        self._check_root(shape)
        self._announce(shape.name, _shape_selector_text(shape))
        return compile_selector(shape.selector, shape.name), shape

    def _jsonl_first_shape(self) -> None:
        try:
            with _open_binary(self.path) as fh:
                for n, raw in enumerate(fh, 1):
                    if len(raw) > MAX_LINE_BYTES or n > 1000:
                        return
                    if raw.strip():
                        rec = json.loads(raw)
                        shape = detect_record(rec)
                        if shape is not None:
                            self._check_root(shape)
                            self._announce(shape.name, _shape_selector_text(shape))
                        return
        except (ValueError, RecursionError):
            return  # reported per line while reading

    def _check_root(self, shape: Shape) -> None:
        if shape.needs_root and not self.roots:
            raise FileListError(
                f"{self.path}: looks like an {shape.name} index, whose file names are relative to a data root "
                "(mmdet3d's data_root and data_prefix): pass root=, e.g. root='s3://bucket/nuscenes' with "
                "per-modality roots pts=samples/LIDAR_TOP, CAM_FRONT=samples/CAM_FRONT, sweeps=sweeps/LIDAR_TOP"
            )

    def _select_in_memory(self, doc: Any, sel: Selector, shape: Shape | None, stats: ListStats,
                          doc_bytes: int) -> Iterator[tuple[list[int], list[Any], list[str | None], list[int | None]]]:
        if isinstance(doc, tuple):
            doc = list(doc)
        if sel.array is not None:
            yield from self._select_records(sel.records(doc), sel, shape, stats, doc_bytes)
            return
        try:
            result = sel.on_document(doc)
        except RecursionError:
            raise FileListError(f"{self.path}: the document nests too deeply for the selector") from None
        except Exception as exc:  # noqa: BLE001 - jmespath raises several types on bad data
            raise FileListError(f"{self.path}: selector {sel.expression!r} failed: {exc}") from None
        out: tuple[list[int], list[Any], list[str | None], list[int | None]] = ([], [], [], [])
        budget = [2 * doc_bytes + 1024]
        stats.records += 1
        pos = 0
        for p, tag, problem in flatten(result, budget):
            pos += 1
            stats.selected += 1
            if problem:
                stats.add_unreadable(pos, problem)
                continue
            out[0].append(pos)
            out[1].append(p)
            out[2].append(tag)
            out[3].append(None)
            if len(out[0]) >= _DOC_BATCH:
                yield out
                out = ([], [], [], [])
        yield out

    def _select_records(self, records: Iterable[Any], sel: Selector, shape: Shape | None, stats: ListStats,
                        doc_bytes: int) -> Iterator[tuple[list[int], list[Any], list[str | None], list[int | None]]]:
        out: tuple[list[int], list[Any], list[str | None], list[int | None]] = ([], [], [], [])
        budget = [2 * doc_bytes + 1024]
        paths_shape = shape is not None and shape.name == "paths"
        n = 0
        for rec in records:
            n += 1
            stats.records += 1
            if paths_shape:
                self._path_record(rec, n, stats, out)
            else:
                try:
                    value = sel.on_record(rec) if sel.record is not None else rec
                except RecursionError:
                    raise FileListError(f"{self.path}: record {n} nests too deeply for the selector") from None
                except Exception as exc:  # noqa: BLE001 - jmespath raises several types on bad data
                    stats.add_unreadable(n, f"selector failed: {exc}")
                    continue
                self._emit(value, n, stats, out, budget)
            if len(out[0]) >= _DOC_BATCH:
                yield out
                out = ([], [], [], [])
        yield out

    def _emit(self, value: Any, n: int, stats: ListStats,
              out: tuple[list[int], list[Any], list[str | None], list[int | None]], budget: list[int]) -> None:
        for p, tag, problem in flatten(value, budget):
            stats.selected += 1
            if problem:
                stats.add_unreadable(n, problem)
                continue
            out[0].append(n)
            out[1].append(p)
            out[2].append(tag)
            out[3].append(None)

    def _path_record(self, item: Any, n: int, stats: ListStats,
                     out: tuple[list[int], list[Any], list[str | None], list[int | None]]) -> None:
        """One element of a plain list: a path string, or an object naming a path (and a size)."""
        if isinstance(item, str):
            stats.selected += 1
            out[0].append(n)
            out[1].append(item)
            out[2].append(None)
            out[3].append(None)
            return
        if not isinstance(item, dict):
            stats.add_unreadable(n, f"expected str or dict, got {type(item).__name__}")
            return
        key = next((item[f] for f in PATH_FIELDS if isinstance(item.get(f), str)), None)
        if key is None:
            stats.add_unreadable(n, f"dict without a str {' or '.join(repr(f) for f in PATH_FIELDS[:2])}")
            return
        try:
            size = _parse_size(item.get("size"))
        except ValueError:
            stats.add_unreadable(n, f"bad size {item.get('size')!r:.40}")
            return
        stats.selected += 1
        out[0].append(n)
        out[1].append(key)
        out[2].append(None)
        out[3].append(size)


def _shape_selector_text(shape: Shape) -> str:
    if shape.name == "paths":
        return shape.selector + " (each a path string or an object with " + "|".join(PATH_FIELDS) + " and size)"
    return shape.selector


def _describe_doc(doc: Any) -> str:
    if isinstance(doc, dict):
        keys = [str(k) for k in doc][:12]
        firsts = {str(k): v[0] for k, v in doc.items() if isinstance(v, list) and v}
        return describe_top(keys, firsts)
    if isinstance(doc, (list, tuple)):
        return describe_top([], {"": doc[0]} if doc else {})
    return f"a {type(doc).__name__}"


def read_file_list(path: str | Path, *, fmt: str | None = None, dedupe: bool = True, select: str | None = None,
                   root: str | Mapping[str, str] | None = None,
                   max_document_bytes: int = MAX_DOCUMENT_BYTES) -> FileList:
    """Open a file list or dataset index for streaming. Format from `fmt` or the file extension.

    `select`: JMESPath for pkl/JSON/JSON Lines, column names ("cam_front,lidar") for csv/parquet.
    `root`: "s3://bucket/prefix" (or "bucket/prefix") joined to relative paths, or a mapping with
    "" for the base root and per-tag roots. Checks a regular file now (exists, header or shape,
    pkl loaded safely), so a wrong list fails before any work starts.
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
    if select is not None and not select.strip():
        raise FileListError("empty selector")
    if select is not None and f == "txt":
        raise FileListError(f"{p}: a txt list is one path a line; select= applies to pkl, json, jsonl (JMESPath) "
                            "and csv, parquet (column names)")
    fl = FileList(p, f, dedupe=dedupe, select=select, root=root, max_document_bytes=max_document_bytes)
    # Checked only on regular files: opening a FIFO twice would lose its data.
    if stat.S_ISREG(st.st_mode):
        fl._open_checks()
    return fl


# -- helpers --------------------------------------------------------------------------------------

def _open_binary(path: Path) -> io.BufferedReader:
    try:
        return open(path, "rb", buffering=_READ_CHUNK)
    except OSError as exc:
        raise FileListError(f"cannot open file list {path}: {exc.strerror or exc}") from None


def _open_text(path: Path) -> io.TextIOWrapper:
    # Undecodable bytes become lone surrogates, which validate_key refuses as not_utf8: one bad
    # line must not stop the list. utf-8-sig drops a BOM some tools write.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _line_chunks(path: Path, stats: ListStats) -> Iterator[list[Any]]:
    """The file's lines (split on b"\\n") a read at a time: a list of str when the whole read
    decodes as UTF-8 (the fast, common case), else of bytes, with None for a line longer than
    MAX_LINE_BYTES (counted unreadable). A read returns what is there (a FIFO's writer is not
    waited for), so the first lines arrive before the file ends."""
    with _open_binary(path) as fh:
        tail = b""
        n = 0
        skipping = False  # inside an over-long line
        while True:
            chunk = fh.read1(_READ_CHUNK)
            if not chunk:
                break
            data = tail + chunk if tail else chunk
            parts: list[Any] = data.split(b"\n")
            tail = parts.pop()
            if skipping and parts:
                parts[0] = None  # the end of the long line
                skipping = False
            if len(tail) > MAX_LINE_BYTES:
                skipping = True
                tail = b""
            if not parts:
                continue
            if parts[0] is not None and max(map(len, parts)) <= MAX_LINE_BYTES:
                try:
                    text = data[:len(data) - len(tail) - 1].decode("utf-8") if not skipping else None
                except UnicodeDecodeError:
                    text = None
                if text is not None:
                    n += len(parts)
                    yield text.split("\n")
                    continue
            out: list[bytes | None] = []
            for raw in parts:
                n += 1
                if raw is None or len(raw) > MAX_LINE_BYTES:
                    stats.add_unreadable(n, f"line longer than {MAX_LINE_BYTES:,} bytes")
                    out.append(None)
                else:
                    out.append(raw)
            yield out
        if skipping:
            n += 1
            stats.add_unreadable(n, f"line longer than {MAX_LINE_BYTES:,} bytes")
            yield [None]
        elif tail:
            yield [tail]


class _Lines:
    """Lines of a file for csv.reader (ends kept, split on \\n, \\r\\n, \\r only), telling
    whether the next line needs a read: a read returns what is there, so rows of a FIFO are
    handed on before its writer has finished."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
        self.pending: list[str] = []
        self.tail = ""
        self.eof = False

    def buffered(self) -> bool:
        return bool(self.pending)

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        while not self.pending:
            if self.eof:
                raise StopIteration
            chunk = self.fh.read1(_READ_CHUNK)  # type: ignore[attr-defined]
            text = self.decoder.decode(chunk, final=not chunk)
            if not chunk:
                self.eof = True
            text = self.tail + text
            keep = "" if self.eof else ("\r" if text.endswith("\r") else "")
            if keep:
                text = text[:-1]
            parts = _NEWLINE.findall(text)
            rest = text[sum(map(len, parts)):]
            if self.eof:
                if rest:
                    parts.append(rest)
                self.tail = ""
            else:
                self.tail = rest + keep
            self.pending = parts[::-1]
        return self.pending.pop()


def _cell_paths(cell: str, stats: ListStats, n: int) -> list[str]:
    """A csv cell: one path, or a JSON array of paths (a list column)."""
    c = cell.strip()
    if not c:
        return []
    if c[0] == "[":
        try:
            v = json.loads(c)
        except (ValueError, RecursionError):
            stats.add_unreadable(n, f"bad list cell {c[:40]!r}")
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            stats.add_unreadable(n, f"list cell is not a list of strings: {c[:40]!r}")
            return []
        return v
    return [c]


def _csv_columns(path: Path, header: list[str] | None, select: str | None) -> tuple[list[int], int | None]:
    if header is None:
        raise FileListError(f"csv file list {path} is empty (expected a header with a key or path column)")
    names = [h.strip().lower() for h in header]
    if select is not None:
        cols = []
        for want in [s.strip() for s in select.split(",") if s.strip()]:
            if want.lower() not in names:
                raise FileListError(f"csv file list {path}: no column {want!r} in header {header!r}")
            cols.append(names.index(want.lower()))
    else:
        key_col = next((names.index(c) for c in _KEY_COLUMNS if c in names), None)
        if key_col is None:
            raise FileListError(f"csv file list {path}: no 'key' or 'path' column in header {header!r}; "
                                "name the path column(s) with select=")
        cols = [key_col]
    size_col = names.index("size") if "size" in names else None
    return cols, size_col


def _parse_size(value: Any) -> int | None:
    """None for an empty size; ValueError for anything but a non-negative integer."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(value)  # noqa: TRY004 - callers catch ValueError for every bad size
    if isinstance(value, str):
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq  # only for parquet lists

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise FileListError(f"parquet file list {path} cannot be read: {exc}") from None


def _parquet_columns(path: Path, pf: Any, select: str | None) -> tuple[list[str], str | None]:
    import pyarrow as pa

    schema = pf.schema_arrow
    by_lower = {name.lower(): name for name in schema.names}
    if select is not None:
        cols = []
        for want in [s.strip() for s in select.split(",") if s.strip()]:
            if want.lower() not in by_lower:
                raise FileListError(f"parquet file list {path}: no column {want!r} in {schema.names}")
            cols.append(by_lower[want.lower()])
    else:
        key_col = next((by_lower[c] for c in _KEY_COLUMNS if c in by_lower), None)
        if key_col is None:
            raise FileListError(f"parquet file list {path}: no 'key' or 'path' column in {schema.names}; "
                                "name the path column(s) with select=")
        cols = [key_col]
    is_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16

    def stringy(t: Any) -> bool:
        return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t))

    for c in cols:
        t = schema.field(c).type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or getattr(pa.types, "is_list_view", lambda t: False)(t):
            t = t.value_type
        if not stringy(t):
            raise FileListError(f"parquet file list {path}: column {c!r} is {schema.field(c).type}, expected strings "
                                "or lists of strings")
    size_col = by_lower.get("size")
    if size_col is not None and not pa.types.is_integer(schema.field(size_col).type):
        raise FileListError(
            f"parquet file list {path}: column {size_col!r} is {schema.field(size_col).type}, expected integers"
        )
    return cols, size_col


def _load_pkl(path: Path, max_bytes: int) -> Any:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FileListError(f"pkl file list {path}: {exc.strerror or exc}") from None
    if stat.S_ISREG(path.stat().st_mode) and size > max_bytes:
        raise FileListError(f"pkl file list {path}: {size / 2**20:,.0f} MiB is above the {max_bytes / 2**20:,.0f} MiB "
                            "limit (a pickle is loaded whole); raise max_document_bytes or export the paths as "
                            "txt / parquet / JSON Lines")
    with _open_binary(path) as fh:
        try:
            # A regular file's size was checked; a FIFO's reads are counted (slower, rare).
            return safe_pickle.load(fh if stat.S_ISREG(path.stat().st_mode) else _Capped(fh, max_bytes))
        except FileListError as exc:
            raise FileListError(f"pkl file list {path}: {exc}") from None


class _Capped(io.RawIOBase):
    """A reader that fails once more than `limit` bytes were read (a FIFO has no size to check)."""

    def __init__(self, fh: IO[bytes], limit: int) -> None:
        self.fh = fh
        self.left = limit

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self._count(len(data))
        return data

    def readinto(self, b: Any) -> int:
        got = self.fh.readinto(b)  # type: ignore[attr-defined]
        self._count(got or 0)
        return got  # type: ignore[no-any-return]

    def readline(self, size: int | None = -1) -> bytes:
        data = self.fh.readline(-1 if size is None else size)
        self._count(len(data))
        return data

    def peek(self, n: int = 0) -> bytes:
        return self.fh.peek(n)  # type: ignore[attr-defined,no-any-return]

    def _count(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise FileListError("the pickle is larger than max_document_bytes")


__all__ = [
    "FORMATS",
    "MAX_REASONS",
    "EntryBatch",
    "FileList",
    "ListEntry",
    "ListStats",
    "detect_format",
    "read_file_list",
]
