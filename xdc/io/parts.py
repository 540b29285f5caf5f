"""Multipart ETags and part layouts (pure functions, no I/O).

An S3 multipart object's ETag is MD5(MD5(part 1) || ... || MD5(part N)) in hex, then "-N". A copy
keeps it only when it uploads the same part sizes. When the source endpoint cannot tell its part
sizes, `candidate_part_sizes` lists the uniform layouts that fit: nearly every writer uses one part
size (the last part holds the rest), so the size and N bound it to (size/N, size/(N-1)], and the
writers' usual sizes (boto3 and the AWS CLI 8 MiB, rclone 5 MiB, s5cmd 50 MiB, powers of two...)
come first. `LayoutHasher` computes a layout's ETag while the bytes stream through once, in order.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

MIB = 2**20
MB = 10**6
MAX_PARTS = 10_000  # S3's limit
MAX_SINGLE_PUT = 5 * 2**30  # S3's largest single PUT

_MULTIPART = re.compile(r"^[0-9a-f]{32}-(\d+)$")
_PLAIN = re.compile(r"^[0-9a-f]{32}$")

# Part sizes writers use by default, most common first: boto3/AWS CLI (and their doublings for big
# files), rclone, s5cmd, and round sizes people configure.
WELL_KNOWN_PART_SIZES: tuple[int, ...] = (
    8 * MIB, 5 * MIB, 16 * MIB, 50 * MIB, 64 * MIB, 10 * MIB, 32 * MIB, 100 * MIB, 128 * MIB, 15 * MIB,
    25 * MIB, 256 * MIB, 512 * MIB, 1024 * MIB, 5 * MB, 8 * MB, 10 * MB, 16 * MB, 50 * MB, 100 * MB,
)


def plain_md5_etag(etag: str) -> bool:
    """A single-part upload's ETag is the MD5 of the bytes; a multipart one has a '-N' suffix."""
    return bool(_PLAIN.match(etag))


def parts_in_etag(etag: str) -> int | None:
    """N of a multipart ETag ("<32 hex>-N"), else None."""
    m = _MULTIPART.match(etag.strip('"'))
    return int(m.group(1)) if m else None


def multipart_etag(part_md5s: Iterable[bytes]) -> str:
    """The ETag S3 gives an object completed from parts with these MD5 digests."""
    digests = list(part_md5s)
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def uniform_layout(size: int, part_size: int) -> list[int]:
    """Parts of `part_size` bytes, the last one holding the rest (at least one part)."""
    if part_size <= 0:
        raise ValueError("part size must be positive")
    if size <= 0:
        return [0]
    full, rest = divmod(size, part_size)
    return [part_size] * full + ([rest] if rest else [])


def part_size_range(size: int, parts: int) -> tuple[int, int] | None:
    """The part sizes P whose uniform layout of `size` bytes has exactly `parts` parts: lo..hi
    inclusive, or None when there is none."""
    if parts < 1 or size < parts:
        return None
    if parts == 1:
        return (size, size) if size > 0 else None
    lo = -(-size // parts)  # ceil(size / parts)
    hi = -(-size // (parts - 1)) - 1  # below size / (parts - 1)
    return (lo, hi) if lo <= hi else None


def candidate_part_sizes(size: int, parts: int, *, preferred: Sequence[int] = (), limit: int = 4) -> list[int]:
    """Uniform part sizes that give `parts` parts for `size` bytes, most likely first, at most `limit`:
    `preferred` ones (learned from earlier copies, the configured chunk), then well-known writer
    defaults, then whole MiB and whole MB sizes in the range, smallest first."""
    rng = part_size_range(size, parts)
    if rng is None:
        return []
    lo, hi = rng
    out: list[int] = []

    def add(p: int) -> None:
        if lo <= p <= hi and p not in out:
            out.append(p)

    for p in preferred:
        add(p)
    for p in WELL_KNOWN_PART_SIZES:
        add(p)
    for unit in (MIB, MB):
        first = -(-lo // unit)
        for k in range(first, min(hi // unit, first + limit) + 1):
            add(k * unit)
    if parts == 1:
        add(size)
    return out[:limit]


class LayoutHasher:
    """The multipart ETag of one layout, computed from the object's bytes fed in order."""

    def __init__(self, layout: Sequence[int]) -> None:
        self.layout = list(layout)
        self._digests: list[bytes] = []
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._left = self.layout[0] if self.layout else 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            if self._left == 0:
                raise ValueError("more bytes than the layout holds")
            take = min(self._left, len(view))
            self._md5.update(view[:take])
            view = view[take:]
            self._left -= take
            if self._left == 0:
                self._digests.append(self._md5.digest())
                self._md5 = hashlib.md5(usedforsecurity=False)
                i = len(self._digests)
                self._left = self.layout[i] if i < len(self.layout) else 0

    def etag(self) -> str | None:
        """The layout's ETag, or None if the bytes fed did not fill it exactly."""
        if len(self._digests) != len(self.layout):
            return None
        return multipart_etag(self._digests)
