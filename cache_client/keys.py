"""Object keys: validation, mapping into a datacenter, and their place inside a cache mount.

Every key handled by the cache client is the string "bucket/key". Keys come from file lists
written by people and tools, so they are checked once here before they turn into paths: a key
that could climb out of a mount ("..", absolute paths, backslashes) or that the mount could not
represent exactly (empty or "." segments, control characters) is refused with a `BadKey`.
"""
from __future__ import annotations

import os
import posixpath
import re
from itertools import repeat
from pathlib import Path

from xdc.config import Route, XdcConfig
from xdc.errors import BadKey, ConfigError

MAX_KEY_BYTES = 1024  # S3's own limit on the key (the part after the bucket)

# Same rule as xdc.config's bucket check (S3 bucket naming).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_GOOD_BUCKETS: set[str] = set()  # names that passed _BUCKET_RE
# One C-level scan for everything a key may never contain: C0/C1 controls, DEL, backslash and
# lone surrogates (what undecodable bytes become under errors="surrogateescape").
_FORBIDDEN_RE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\ud800-\udfff]")


def validate_key(key: str) -> str:
    """Return `key` as "bucket/key", accepting "s3://bucket/key" too; raise BadKey otherwise."""
    if not isinstance(key, str):
        raise BadKey("not_str", f"expected a string, got {type(key).__name__}")
    if key.startswith(("s3://", "S3://")):
        key = key[5:]
    bad = _FORBIDDEN_RE.search(key)
    if bad is not None:
        ch = bad.group()
        if ch == "\\":
            raise BadKey("backslash", repr(key))
        if "\ud800" <= ch <= "\udfff":
            raise BadKey("not_utf8", repr(key))
        raise BadKey("control_char", repr(key))
    if key.startswith("/"):
        raise BadKey("absolute", repr(key))
    bucket, sep, rest = key.partition("/")
    if not sep or not bucket:
        raise BadKey("missing_bucket", f"{key!r}: need bucket/key or s3://bucket/key")
    if bucket not in _GOOD_BUCKETS:
        if not _BUCKET_RE.match(bucket):
            raise BadKey("bad_bucket", repr(bucket))
        if len(_GOOD_BUCKETS) < 4096:  # lists name few buckets; the memo saves a regex a key
            _GOOD_BUCKETS.add(bucket)
    if not rest:
        raise BadKey("missing_key", repr(key))
    # A char is at most 4 UTF-8 bytes: only long keys need encoding to be measured.
    if len(rest) * 4 > MAX_KEY_BYTES and len(rest.encode("utf-8")) > MAX_KEY_BYTES:
        raise BadKey("too_long", f"{len(rest.encode('utf-8'))} bytes > {MAX_KEY_BYTES}: {key[:80]!r}...")
    # Splitting is needed only when a segment may be empty or start with a dot (most keys: no).
    if rest[0] in "./" or rest[-1] == "/" or "/." in rest or "//" in rest:
        segments = rest.split("/")
        if ".." in segments or "." in segments:
            raise BadKey("dot_segment", repr(key))
        # S3 allows "a//b" and "dir/", but a mount path collapses or cannot name them.
        if "" in segments:
            raise BadKey("empty_segment", repr(key))
    return key


# ASCII bytes a key may contain: everything but C0 controls, DEL and backslash ("\n" is the batch
# separator and is checked apart).
_ASCII_OK = bytes(b for b in range(128) if b >= 0x20 and b not in (0x7F, 0x5C)) + b"\n"


_BAD_SEGMENT = re.compile(rb"/[./\n]")  # "/." "//" (dot or empty segments), "/" ending a key


def all_valid(keys: list[str]) -> bool:
    """True when every key is valid and already normal ("bucket/key", no s3://), i.e.
    `validate_key(k) == k` for all: a few C-level scans of the batch instead of one call a key.
    False says nothing about which key is wrong (call validate_key on each for that); non-ASCII
    batches always take that way."""
    if not keys:
        return True
    text = "\n".join(keys)
    if not text.isascii() or text.count("\n") != len(keys) - 1:  # not ASCII, or a key holding a newline
        return False
    data = text.encode("ascii")
    if (data.translate(None, _ASCII_OK)  # a control character, DEL or backslash
            or b"3://" in data or _BAD_SEGMENT.search(data) is not None or data[-1] == 0x2F
            or max(map(len, keys)) * 4 > MAX_KEY_BYTES):
        return False
    # Every key must be "bucket/...": a leading "/" or no "/" at all shows as a bad bucket.
    first = keys[0].partition("/")[0]
    if data.startswith(first.encode() + b"/") and data.count(b"\n" + first.encode() + b"/") == len(keys) - 1:
        buckets = {first}  # one bucket, the common case: one scan proves every line starts with it
    else:
        if not all(map(str.__contains__, keys, repeat("/"))):
            return False
        buckets = {k.partition("/")[0] for k in keys}
    for b in buckets - _GOOD_BUCKETS:
        if not _BUCKET_RE.match(b):
            return False
        if len(_GOOD_BUCKETS) < 4096:
            _GOOD_BUCKETS.add(b)
    return True


def _normalise_prefix(prefix: str) -> str:
    """A dataset prefix as "bucket" or "bucket/some/dir", validated like a key."""
    p = prefix[5:] if prefix.startswith(("s3://", "S3://")) else prefix
    p = p.rstrip("/")
    if "/" not in p:
        if not _BUCKET_RE.match(p):
            raise BadKey("bad_bucket", f"prefix {prefix!r}")
        return p
    return validate_key(p)


def _under(bucket_key: str, prefix: str) -> bool:
    # Segment boundaries: "b/ds1" covers "b/ds1/x", not "b/ds10/x".
    return bucket_key.startswith(prefix + "/")


class KeyMapper:
    """Where an object of one datacenter lives in another: "bucket/key" -> "bucket/key" in `dc`.

    A key whose bucket belongs to `dc` maps to itself. Any other key is mapped through the route
    into `dc` whose source covers it (the longest source prefix wins); `home_dc`, when given,
    restricts that to routes coming from the dataset's home datacenter.
    """

    def __init__(self, cfg: XdcConfig, dc: str, *, home_dc: str | None = None) -> None:
        cfg.dc(dc)  # unknown datacenter -> ConfigError
        if home_dc is not None:
            cfg.dc(home_dc)
        self.dc = dc
        self.home_dc = home_dc
        local = set(cfg.datacenters[dc].buckets)
        for r in cfg.routes:
            if r.source.dc == dc:
                local.add(r.source.bucket)
            if r.target.dc == dc:
                local.add(r.target.bucket)
        self._local_buckets = frozenset(local)
        routes = [r for r in cfg.routes_into(dc) if home_dc is None or r.source.dc == home_dc]
        # Most specific first, so the first covering route is the one to use.
        self._routes: dict[str, list[Route]] = {}
        for r in sorted(routes, key=lambda r: len(r.source.prefix), reverse=True):
            self._routes.setdefault(r.source.bucket, []).append(r)

    def map(self, key: str) -> str:
        bucket_key = validate_key(key)
        bucket, _, rest = bucket_key.partition("/")
        if bucket in self._local_buckets:
            return bucket_key
        for r in self._routes.get(bucket, ()):
            if r.source.covers(bucket, rest):
                # The target prefix comes from config; re-check the result as a key.
                return validate_key(f"{r.target.bucket}/{r.target_key(rest)}")
        raise BadKey("no_route", f"{bucket_key!r} has no route into {self.dc}")

    def map_under(self, key: str, prefix: str | None) -> str:
        """`map`, refusing keys outside the dataset prefix (given in the keys' own namespace)."""
        if prefix:
            bucket_key = validate_key(key)
            p = _normalise_prefix(prefix)
            if not _under(bucket_key, p):
                raise BadKey("outside_prefix", f"{bucket_key!r} is not under {p + '/'!r}")
        return self.map(key)

    def path_in_mount(self, mount: Path, bucket_key: str, bucket_root: str) -> Path:
        """<mount>/<bucket_root>/<bucket>/<key>, checked to stay under the mount."""
        bucket_key = validate_key(bucket_key)
        return path_in_mount(mount, bucket_key, bucket_root)


def path_in_mount(mount: Path, bucket_key: str, bucket_root: str) -> Path:
    """Module-level form of `KeyMapper.path_in_mount` (no config needed)."""
    bucket_key = validate_key(bucket_key)
    root = bucket_root.strip("/")
    if "\\" in root or any(seg in ("..", ".") for seg in root.split("/")):
        raise ConfigError(f"cache.bucket_root must be a plain relative path: {bucket_root!r}")
    # Pure string check (keys are validated): never touches the file system, so it cannot
    # block on or follow symlinks into another mount.
    base = posixpath.normpath(os.fspath(mount))
    joined = posixpath.normpath(posixpath.join(base, root, bucket_key) if root else posixpath.join(base, bucket_key))
    if not joined.startswith(base.rstrip("/") + "/"):
        raise BadKey("outside_mount", f"{bucket_key!r} leaves {base}")
    return Path(joined)


def derived_candidate(bucket_key: str, raw_prefix: str, derived_prefix: str) -> str | None:
    """The 720p derivative of a frame: "b/raw/x/1.jpg" -> "b/720p/x/1.jpg"; None if not a frame.

    `raw_prefix` and `derived_prefix` are key prefixes inside the frame's bucket (as in
    ResizeSettings.prefixes / derived_prefix); the derivative keeps the bucket and file name.
    Whether it exists is for the caller to find out.
    """
    bucket, _, rest = bucket_key.partition("/")
    if not raw_prefix or not rest.startswith(raw_prefix) or len(rest) == len(raw_prefix):
        return None
    candidate = f"{bucket}/{derived_prefix}{rest[len(raw_prefix):]}"
    try:
        return validate_key(candidate)
    except BadKey:
        return None
