"""Object keys of file lists: mapping into a datacenter, and their place inside a cache mount.

Every key handled by the cache client is the string "bucket/key", checked by the one key rule
(`xdc.keys.check_bucket_key`) before it turns into a path: a key that could climb out of a mount
or that the mount could not represent exactly is refused with a `BadKey`.
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path

from xdc.config import Route, XdcConfig
from xdc.errors import BadKey, ConfigError
from xdc.keys import check_bucket_key as validate_key
from xdc.keys import is_bucket_name

def _normalise_prefix(prefix: str) -> str:
    """A dataset prefix as "bucket" or "bucket/some/dir", validated like a key."""
    p = prefix[5:] if prefix.startswith(("s3://", "S3://")) else prefix
    p = p.rstrip("/")
    if "/" not in p:
        if not is_bucket_name(p):
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
        routes = [r for r in cfg.routes if r.target.dc == dc and (home_dc is None or r.source.dc == home_dc)]
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
