"""Stream the records of a large JSON document without loading it.

Dataset indexes in JSON are one big array of records, either the document itself (nuScenes
`sample_data.json`) or the value of one top-level key (COCO `images`, mmdetection3d `data_list`).
`iter_array` yields that array's elements one at a time; the other top-level values are parsed
one element at a time and dropped. Memory is bounded by the largest single element
(`max_element_chars`, default 16 Mi characters: an element above it is a clear FileListError, so
a document made of one giant array nested inside a record cannot exhaust memory).

Each element is parsed by the standard library's C decoder (`raw_decode`) on a sliding text
buffer; nesting deeper than that decoder allows is a FileListError, not a crash.
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from xdc.errors import FileListError

MAX_ELEMENT_CHARS = 16 << 20
_CHUNK = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _Reader:
    """A sliding window over a text stream with the parse position `pos`."""

    def __init__(self, fh: io.TextIOBase, where: str, max_element: int) -> None:
        self.fh = fh
        self.where = where
        self.max_element = max_element
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.consumed = 0  # characters dropped from the front of the buffer

    def fill(self, want: int = _CHUNK) -> bool:
        """Read about `want` more characters; False at end of file."""
        if self.eof:
            return False
        if self.pos > _CHUNK:
            self.consumed += self.pos
            self.buf = self.buf[self.pos:]
            self.pos = 0
        try:
            more = self.fh.read(max(want, _CHUNK))
        except UnicodeDecodeError as exc:
            raise FileListError(f"{self.where}: not UTF-8 text: {exc}") from None
        if not more:
            self.eof = True
            return False
        self.buf += more
        return True

    def offset(self) -> int:
        return self.consumed + self.pos

    def skip_ws(self) -> None:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or not self.fill():
                return

    def peek(self) -> str:
        self.skip_ws()
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            found = repr(c) if c else "end of file"
            raise FileListError(f"{self.where}: invalid JSON at character {self.offset()}: expected "
                                f"{' or '.join(repr(x) for x in chars)}, found {found}")
        self.pos += 1
        return c

    def string(self) -> str:
        self.expect('"')
        start = self.pos - 1
        while True:
            try:
                s, end = json.decoder.scanstring(self.buf, self.pos)  # type: ignore[attr-defined]
            except json.JSONDecodeError as exc:
                if self.eof or not exc.msg.startswith("Unterminated"):
                    raise FileListError(f"{self.where}: invalid JSON at character {self.consumed + exc.pos}: {exc.msg}") from None
                if len(self.buf) - start > self.max_element:
                    raise FileListError(f"{self.where}: a key longer than {self.max_element:,} characters") from None
                self.fill(len(self.buf) - start)
                continue
            self.pos = end
            return s

    def value(self) -> Any:
        """Parse one JSON value at `pos` (C decoder), reading more of the file as needed."""
        self.skip_ws()
        while True:
            # Keep a margin after the value: a number or literal cut by the buffer's end would
            # otherwise parse as a shorter one.
            if not self.eof and len(self.buf) - self.pos < 64:
                self.fill()
                continue
            try:
                val, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated") or exc.pos >= len(self.buf) - 16
                if self.eof or not cut:
                    raise FileListError(f"{self.where}: invalid JSON at character {self.consumed + exc.pos}: {exc.msg}") from None
                self._grow()
                continue
            except RecursionError:
                raise FileListError(f"{self.where}: JSON nested too deeply (at character {self.offset()})") from None
            if end >= len(self.buf) - 1 and not self.eof:
                self._grow()  # make sure what follows the value is in the buffer
                continue
            if end - self.pos > self.max_element:
                self._too_large()
            self.pos = end
            return val

    def _too_large(self) -> NoReturn:
        raise FileListError(f"{self.where}: one JSON element at character {self.offset()} is larger than "
                            f"{self.max_element:,} characters: refused (memory bound)")

    def _grow(self) -> None:
        held = len(self.buf) - self.pos
        if held > self.max_element:
            self._too_large()
        self.fill(held)  # doubles the window: linear total work for a large element


@dataclass
class Peek:
    """What the top of a JSON document looks like, for shape detection."""

    kind: str  # "object", "array" or "scalar"
    keys: list[str] = field(default_factory=list)  # top-level keys seen (objects)
    first: dict[str, Any] = field(default_factory=dict)  # key -> first element of its array ("" = top-level array)
    scalars: dict[str, Any] = field(default_factory=dict)  # key -> small non-array values
    complete: bool = True  # False when peeking stopped early


def _open(path: Path) -> io.TextIOWrapper:
    try:
        raw = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the caller's with
    except OSError as exc:
        raise FileListError(f"cannot open {path}: {exc.strerror or exc}") from None
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape")


def peek(path: Path, stop_at: frozenset[str] = frozenset(), *, max_element_chars: int = MAX_ELEMENT_CHARS) -> Peek:
    """Top-level kind, keys and the first element of each array, reading only as far as needed:
    the walk stops once a key in `stop_at` has shown its first element."""
    with _open(path) as fh:
        r = _Reader(fh, str(path), max_element_chars)
        c = r.peek()
        if c == "[":
            r.pos += 1
            out = Peek("array")
            if r.peek() != "]":
                out.first[""] = r.value()
            return out
        if c != "{":
            if not c:
                raise FileListError(f"{path}: empty JSON document")
            return Peek("scalar")
        out = Peek("object")
        r.pos += 1
        if r.peek() == "}":
            return out
        while True:
            key = r.string()
            r.expect(":")
            out.keys.append(key)
            if r.peek() == "[":
                r.pos += 1
                first = True
                while r.peek() != "]":
                    if not first:
                        r.expect(",")
                    v = r.value()
                    if first:
                        out.first[key] = v
                        first = False
                        if key in stop_at:
                            out.complete = False
                            return out
                r.pos += 1
            else:
                v = r.value()
                if not isinstance(v, (dict, list)) or len(v) < 64:
                    out.scalars[key] = v
            if r.expect(",}") == "}":
                return out


def iter_array(path: Path, key: str | None, *, max_element_chars: int = MAX_ELEMENT_CHARS) -> Iterator[Any]:
    """The elements of the top-level array (key None) or of the array under top-level `key`.

    Yields nothing when the document has no such array (JMESPath's null); FileListError for
    invalid JSON, an element above the bound, or nesting too deep.
    """
    with _open(path) as fh:
        r = _Reader(fh, str(path), max_element_chars)
        c = r.peek()
        if key is None:
            if c != "[":
                if not c:
                    raise FileListError(f"{path}: empty JSON document")
                return
            r.pos += 1
            yield from _elements(r)
            return
        if c != "{":
            if not c:
                raise FileListError(f"{path}: empty JSON document")
            return
        r.pos += 1
        if r.peek() == "}":
            return
        while True:
            k = r.string()
            r.expect(":")
            if r.peek() == "[":
                r.pos += 1
                if k == key:
                    yield from _elements(r)
                    return  # JSON keys should be unique; the first one wins
                for _ in _elements(r):  # skipped one element at a time
                    pass
            else:
                r.value()
            if r.expect(",}") == "}":
                return


def _elements(r: _Reader) -> Iterator[Any]:
    """Elements of an array whose '[' was consumed; consumes the closing ']'."""
    if r.peek() == "]":
        r.pos += 1
        return
    while True:
        yield r.value()
        if r.expect(",]") == "]":
            return


def load_document(path: Path, max_bytes: int) -> Any:
    """The whole document (for selectors that need it), refused above `max_bytes`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise FileListError(f"{path}: {size / 2**20:,.0f} MiB is above the {max_bytes / 2**20:,.0f} MiB limit for a "
                            "selector that needs the whole document; use a streamable selector "
                            "(KEY[].EXPR or [].EXPR) or raise max_document_bytes")
    with _open(path) as fh:
        try:
            text = fh.read()
        except UnicodeDecodeError as exc:
            raise FileListError(f"{path}: not UTF-8 text: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileListError(f"{path}: invalid JSON at character {exc.pos}: {exc.msg}") from None
    except RecursionError:
        raise FileListError(f"{path}: JSON nested too deeply") from None


__all__ = ["MAX_ELEMENT_CHARS", "Peek", "iter_array", "load_document", "peek"]
