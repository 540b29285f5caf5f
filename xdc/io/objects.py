"""What the store layer says about objects and copies (plain values, shared by the sync store and
the async copy engine)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The mirror's own user-metadata keys on the objects it writes: namespaced, so that the source's
# own user metadata travels unchanged beside them.
META_SOURCE_ETAG = "xdc-source-etag"
META_SOURCE_SEQUENCER = "xdc-source-sequencer"
META_SOURCE_DC = "xdc-source-dc"  # the datacenter whose object this is a copy of (echo detection)
META_SOURCE_KEY = "xdc-source-key"  # the key it is a copy of, URL-quoted (echo detection)
META_SOURCE_MTIME = "xdc-source-mtime"  # the source's last-modified (two-way conflict policy)
META_ETAG_NOTE = "xdc-etag-note"  # why the target's ETag differs from the source's, when it does


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str  # without quotes
    metadata: dict[str, str] = field(default_factory=dict)
    last_modified: float = 0.0
    tag_count: int = 0  # x-amz-tagging-count of a GET/HEAD (0: none, or not reported)
    tags: dict[str, str] | None = None  # the tags a copy carried (None: not read)


@dataclass(frozen=True)
class CopyJob:
    """Copy bucket/key of a source store to dst_bucket/dst_key of a target store."""

    bucket: str
    key: str
    dst_bucket: str
    dst_key: str
    # the ETag the caller expects at the source (the event's): a different one means the source
    # changed since, and the copy raises SupersededError so that the newer event carries the bytes
    expect_etag: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)  # the caller's own (xdc-*) keys
    # the span the copy is a step of (an xdc.trace parent: Span or SpanContext; None: not traced).
    # Explicit, because the copy may run on another thread's event loop, outside the caller's context
    trace: Any = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> str:
        return f"{self.bucket}/{self.key}"


Layout = Literal["single", "reported", "inferred", "rechunked"]


@dataclass(frozen=True)
class CopyResult:
    """What landed, and how: `layout` says how the part sizes were chosen (`single`: one PUT;
    `reported`: the source endpoint told them; `inferred`: a candidate reproduced the source's ETag;
    `rechunked`: none did, `note` says why the ETag differs)."""

    landed: ObjectInfo
    source_etag: str
    layout: Layout = "single"
    parts: int = 1
    note: str = ""
    passes: int = 1  # 2 when a first guess of the part size was wrong and the copy was redone

    @property
    def etag_kept(self) -> bool:
        return self.landed.etag == self.source_etag
