"""The one object-key validator and the one bucket-name rule, used by events, file lists, routes.

Keys come from event notifications written by other systems and from file lists written by people,
and they end up as object keys in another datacenter and as paths inside cache mounts. A key that
could climb out of a prefix or a mount ("..", absolute paths, backslashes), that a mount could not
represent exactly (empty or "." segments, "a//b", a trailing "/"), or that no store can hold
(control characters, lone surrogates, over 1,024 UTF-8 bytes) is refused with the reason, never
cleaned: a cleaned key would name a different object.
"""
from __future__ import annotations

import re
from itertools import repeat

from xdc.errors import BadKey

MAX_KEY_BYTES = 1024  # S3's own limit on an object key

# S3 bucket naming: 3-63 characters, lower-case letters, digits, dots and hyphens, alphanumeric ends.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_GOOD_BUCKETS: set[str] = set()  # names that passed BUCKET_RE: lists name few buckets

# One C-level scan for everything a key may never contain: C0/C1 controls, DEL, backslash and
# lone surrogates (what undecodable bytes become under errors="surrogateescape").
_FORBIDDEN_RE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\ud800-\udfff]")


def is_bucket_name(name: str) -> bool:
    if name in _GOOD_BUCKETS:
        return True
    if not isinstance(name, str) or not BUCKET_RE.match(name):
        return False
    if len(_GOOD_BUCKETS) < 4096:
        _GOOD_BUCKETS.add(name)
    return True


def check_bucket(name: str) -> str:
    """Return `name` if it is a valid S3 bucket name, else raise BadKey("bad_bucket")."""
    if not is_bucket_name(name):
        raise BadKey("bad_bucket", repr(name)[:80])
    return name


def check_key(key: str, max_bytes: int = MAX_KEY_BYTES) -> str:
    """Return the object key (the part after the bucket) if it is usable as it is; else BadKey."""
    if not isinstance(key, str):
        raise BadKey("not_str", f"expected a string, got {type(key).__name__}")
    if not key:
        raise BadKey("missing_key", "empty key")
    bad = _FORBIDDEN_RE.search(key)
    if bad is not None:
        ch = bad.group()
        if ch == "\\":
            raise BadKey("backslash", repr(key)[:120])
        if "\ud800" <= ch <= "\udfff":
            raise BadKey("not_utf8", repr(key)[:120])
        raise BadKey("control_char", repr(key)[:120])
    if key.startswith("/"):
        raise BadKey("absolute", repr(key)[:120])
    # A char is at most 4 UTF-8 bytes: only long keys need encoding to be measured.
    if len(key) * 4 > max_bytes and len(key.encode("utf-8")) > max_bytes:
        raise BadKey("too_long", f"{len(key.encode('utf-8'))} bytes > {max_bytes}: {key[:80]!r}...")
    # Splitting is needed only when a segment may be empty or start with a dot (most keys: no).
    if key[0] == "." or key[-1] == "/" or "/." in key or "//" in key:
        segments = key.split("/")
        if ".." in segments or "." in segments:
            raise BadKey("dot_segment", repr(key)[:120])
        if "" in segments:  # S3 allows "a//b" and "dir/", but a mount path collapses or cannot name them
            raise BadKey("empty_segment", repr(key)[:120])
    return key


def check_bucket_key(value: str, max_bytes: int = MAX_KEY_BYTES) -> str:
    """Return "bucket/key" from "bucket/key" or "s3://bucket/key"; else BadKey."""
    if not isinstance(value, str):
        raise BadKey("not_str", f"expected a string, got {type(value).__name__}")
    if value.startswith(("s3://", "S3://")):
        value = value[5:]
    if value.startswith("/"):
        raise BadKey("absolute", repr(value)[:120])
    bucket, sep, key = value.partition("/")
    if not sep or not bucket:
        raise BadKey("missing_bucket", f"{value[:120]!r}: need bucket/key or s3://bucket/key")
    check_bucket(bucket)
    if key.startswith("/"):  # "bucket//key": the path is not absolute, its first segment is empty
        raise BadKey("empty_segment", repr(value)[:120])
    check_key(key, max_bytes)
    return value


# ASCII bytes a key may contain: everything but C0 controls, DEL and backslash ("\n" is the batch
# separator and is checked apart).
_ASCII_OK = bytes(b for b in range(128) if b >= 0x20 and b not in (0x7F, 0x5C)) + b"\n"
_BAD_SEGMENT = re.compile(rb"/[./\n]")  # "/." "//" (dot or empty segments), "/" ending a key


def all_valid(keys: list[str]) -> bool:
    """True when every key is valid and already normal ("bucket/key", no s3://), i.e.
    `check_bucket_key(k) == k` for all: a few C-level scans of the batch instead of one call a key
    (file lists of millions of keys). False says nothing about which key is wrong (call
    check_bucket_key on each for that); non-ASCII batches always take that way."""
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
    return all(is_bucket_name(b) for b in buckets)
