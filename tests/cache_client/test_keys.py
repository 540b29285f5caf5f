"""Key validation, mapping into a datacenter, and paths inside a cache mount (pure logic)."""
from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_client.keys import KeyMapper, derived_candidate, path_in_mount, validate_key
from xdc.config import XdcConfig, parse_config
from xdc.errors import BadKey, ConfigError
from xdc.keys import all_valid


def _dc(buckets: list[str]) -> dict[str, Any]:
    return {
        "s3": {
            "internal_url": "http://127.0.0.1:9000",
            "external_url": "http://127.0.0.1:9000",
            "credentials": {"access_key_env": "AK", "secret_key_env": "SK"},
        },
        "kafka": {"bootstrap_servers": ["127.0.0.1:9092"]},
        "buckets": buckets,
    }


@pytest.fixture(scope="module")  # the config is immutable
def cfg() -> XdcConfig:
    return parse_config(
        {
            "datacenters": {"idc-a": _dc(["only-a"]), "idc-b": _dc(["local-b"]), "idc-c": _dc([])},
            "routes": [
                {"source": {"dc": "idc-a", "bucket": "frames-a", "prefix": "datasets/"},
                 "target": {"dc": "idc-b", "bucket": "frames-b", "prefix": "mirror/datasets/"}},
                {"source": {"dc": "idc-a", "bucket": "frames-a", "prefix": "datasets/special/"},
                 "target": {"dc": "idc-b", "bucket": "special-b", "prefix": ""}},
                {"source": {"dc": "idc-a", "bucket": "shared", "prefix": ""},
                 "target": {"dc": "idc-b", "bucket": "shared", "prefix": ""}},
                {"source": {"dc": "idc-c", "bucket": "frames-c", "prefix": ""},
                 "target": {"dc": "idc-b", "bucket": "from-c", "prefix": "c/"}},
            ],
        }
    )


# -- validate_key --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("bkt/a/b.jpg", "bkt/a/b.jpg"),
        ("s3://bkt/a/b.jpg", "bkt/a/b.jpg"),
        ("S3://bkt/a", "bkt/a"),
        ("bkt/with space/é.jpg", "bkt/with space/é.jpg"),
        ("bkt/a..b/c", "bkt/a..b/c"),
        ("bkt/" + "x" * 1024, "bkt/" + "x" * 1024),
    ],
)
def test_validate_key_accepts(raw: str, expected: str) -> None:
    assert validate_key(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("bkt/../etc/passwd", "dot_segment"),
        ("bkt/a/..", "dot_segment"),
        ("bkt/./a", "dot_segment"),
        ("/bkt/a", "absolute"),
        ("s3:///bkt/a", "absolute"),
        ("bkt//a", "empty_segment"),
        ("bkt/a/", "empty_segment"),
        ("bkt/a\x00b", "control_char"),
        ("bkt/a\nb", "control_char"),
        ("bkt/a\x7f", "control_char"),
        ("bkt/a\\..\\b", "backslash"),
        ("bkt/a\udcff", "not_utf8"),
        ("bkt/" + "x" * 1025, "too_long"),
        ("bkt/" + "é" * 513, "too_long"),  # 1026 bytes in 513 characters
        ("nobucket", "missing_bucket"),
        ("", "missing_bucket"),
        ("s3://", "missing_bucket"),
        ("Bad_Bucket/a", "bad_bucket"),
        ("bkt/", "missing_key"),
    ],
)
def test_validate_key_refuses(raw: str, reason: str) -> None:
    with pytest.raises(BadKey) as err:
        validate_key(raw)
    assert err.value.reason == reason


def test_validate_key_refuses_non_str() -> None:
    with pytest.raises(BadKey) as err:
        validate_key(b"bkt/a")  # type: ignore[arg-type]
    assert err.value.reason == "not_str"


# -- KeyMapper -----------------------------------------------------------------------------------

def test_map_through_route(cfg: XdcConfig) -> None:
    m = KeyMapper(cfg, "idc-b")
    assert m.map("s3://frames-a/datasets/x/1.jpg") == "frames-b/mirror/datasets/x/1.jpg"
    assert m.map("frames-c/y") == "from-c/c/y"


def test_longest_source_prefix_wins(cfg: XdcConfig) -> None:
    assert KeyMapper(cfg, "idc-b").map("frames-a/datasets/special/y.jpg") == "special-b/y.jpg"


@pytest.mark.parametrize("key", ["local-b/k", "shared/k/1", "frames-b/mirror/datasets/x", "special-b/q"])
def test_identity_for_buckets_of_the_dc(cfg: XdcConfig, key: str) -> None:
    assert KeyMapper(cfg, "idc-b").map(key) == key


def test_identity_for_source_buckets_at_home(cfg: XdcConfig) -> None:
    m = KeyMapper(cfg, "idc-a")
    assert m.map("frames-a/anything/at/all") == "frames-a/anything/at/all"
    assert m.map("only-a/k") == "only-a/k"


@pytest.mark.parametrize(("dc", "key"), [("idc-b", "frames-a/other/z"), ("idc-b", "only-a/k"), ("idc-a", "frames-b/x")])
def test_no_route(cfg: XdcConfig, dc: str, key: str) -> None:
    with pytest.raises(BadKey) as err:
        KeyMapper(cfg, dc).map(key)
    assert err.value.reason == "no_route"


def test_home_dc_restricts_routes(cfg: XdcConfig) -> None:
    from_a = KeyMapper(cfg, "idc-b", home_dc="idc-a")
    assert from_a.map("frames-a/datasets/x") == "frames-b/mirror/datasets/x"
    with pytest.raises(BadKey):
        from_a.map("frames-c/y")  # that route comes from idc-c
    assert KeyMapper(cfg, "idc-b", home_dc="idc-c").map("frames-c/y") == "from-c/c/y"


def test_unknown_dc(cfg: XdcConfig) -> None:
    with pytest.raises(ConfigError):
        KeyMapper(cfg, "idc-z")


def test_map_under_prefix(cfg: XdcConfig) -> None:
    m = KeyMapper(cfg, "idc-b")
    assert m.map_under("frames-a/datasets/x/1", "s3://frames-a/datasets/x/") == "frames-b/mirror/datasets/x/1"
    assert m.map_under("frames-a/datasets/x/1", "frames-a") == "frames-b/mirror/datasets/x/1"
    assert m.map_under("frames-a/datasets/x/1", None) == "frames-b/mirror/datasets/x/1"
    for outside in ("frames-a/datasets/xy/1", "frames-a/datasets/x", "frames-c/datasets/x/1"):
        with pytest.raises(BadKey) as err:
            m.map_under(outside, "frames-a/datasets/x")
        assert err.value.reason == "outside_prefix"
    with pytest.raises(BadKey):
        m.map_under("frames-a/datasets/x/1", "frames-a/../x")


# -- paths in the mount --------------------------------------------------------------------------

def test_path_in_mount(cfg: XdcConfig) -> None:
    m = KeyMapper(cfg, "idc-b")
    assert m.path_in_mount(Path("/jfs"), "bkt/a/b.jpg", "") == Path("/jfs/bkt/a/b.jpg")
    assert m.path_in_mount(Path("/jfs/"), "s3://bkt/a", "/buckets/") == Path("/jfs/buckets/bkt/a")
    with pytest.raises(BadKey):
        m.path_in_mount(Path("/jfs"), "bkt/../../etc/passwd", "")
    for root in ("..", "a/../..", "a\\b"):
        with pytest.raises(ConfigError):
            path_in_mount(Path("/jfs"), "bkt/a", root)


# -- derivatives ---------------------------------------------------------------------------------

def test_derived_candidate() -> None:
    assert derived_candidate("bkt/raw/cam1/0001.jpg", "raw/", "720p/") == "bkt/720p/cam1/0001.jpg"
    assert derived_candidate("bkt/other/0001.jpg", "raw/", "720p/") is None
    assert derived_candidate("bkt/raw/", "raw/", "720p/") is None
    assert derived_candidate("bkt/raw/x.jpg", "", "720p/") is None
    assert derived_candidate("bkt/raw/x.jpg", "raw/", "../") is None  # a bad derived prefix


# -- properties ----------------------------------------------------------------------------------

_SEGMENTS = st.sampled_from(
    ["", ".", "..", "a", "b c", "é", "x\x00", "\\", "frames-a", "datasets", "special", "x", "s3:", "shared",
     "frames-c", "local-b", "..a", "~", "%2e%2e"]
)
_KEYS = st.one_of(
    st.lists(_SEGMENTS, min_size=1, max_size=6).map("/".join),
    st.text(max_size=60),
    st.lists(_SEGMENTS, min_size=1, max_size=6).map(lambda s: "s3://" + "/".join(s)),
)


@settings(max_examples=300, deadline=None)
@given(key=_KEYS)
def test_mapping_never_leaves_mount_or_target_prefix(cfg: XdcConfig, key: str) -> None:
    mount = Path("/mnt/jfs")
    m = KeyMapper(cfg, "idc-b")
    try:
        mapped = m.map(key)
    except BadKey:
        return
    assert validate_key(mapped) == mapped
    src = validate_key(key)
    if mapped != src:  # went through a route: lands under its target prefix
        assert any(mapped.startswith(f"{r.target.bucket}/{r.target.prefix}") for r in cfg.routes if r.target.dc == "idc-b")
    path = m.path_in_mount(mount, mapped, "buckets")
    s = str(path)
    assert s.startswith("/mnt/jfs/buckets/")
    assert posixpath.normpath(s) == s
    assert ".." not in Path(s).parts


@settings(max_examples=300, deadline=None)
@given(key=_KEYS, root=st.sampled_from(["", "b", "/b/", "x/y"]))
def test_path_in_mount_never_escapes(key: str, root: str) -> None:
    try:
        path = path_in_mount(Path("/mnt/jfs"), key, root)
    except BadKey:
        return
    assert str(path).startswith("/mnt/jfs/")
    assert path.parts[:3] == ("/", "mnt", "jfs") and ".." not in path.parts


@settings(max_examples=200, deadline=None)
@given(key=_KEYS)
def test_validate_key_is_idempotent(key: str) -> None:
    try:
        once = validate_key(key)
    except BadKey:
        return
    assert validate_key(once) == once


@settings(max_examples=300, deadline=None)
@given(key=_KEYS)
def test_segment_fast_path_agrees_with_splitting(key: str) -> None:
    try:
        out = validate_key(key)
    except BadKey as exc:
        if exc.reason in ("dot_segment", "empty_segment"):
            segs = key.removeprefix("s3://").partition("/")[2].split("/")
            assert {"", ".", ".."} & set(segs)
        return
    assert not {"", ".", ".."} & set(out.partition("/")[2].split("/"))


# -- the batch check the file-list reader uses -----------------------------------------------------

_PIECES = st.sampled_from(["bkt", "my-bucket.x", "a", "/", "//", "/.", "./", "..", ".", "s3://", "S3://", "x", "é",
                           "\\", "\x00", "\x7f", "\n", " ", "#", "-", "frame-000001.jpg", "A", "b" * 300])


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(st.builds("".join, st.lists(_PIECES, min_size=1, max_size=6)), min_size=1, max_size=8))
def test_all_valid_never_accepts_what_validate_key_refuses_or_rewrites(keys: list[str]) -> None:
    if all_valid(keys):
        for k in keys:
            assert validate_key(k) == k


def test_all_valid_accepts_ordinary_batches() -> None:
    assert all_valid([f"frames/datasets/cam{i % 8}/frame-{i:09d}.jpg" for i in range(5000)])
    assert all_valid(["bk1/x", "bk2/y/z", "bkt.with.dots/a b"])
    assert not all_valid(["bkt/a", "bkt/../b"]) and not all_valid(["s3://bkt/a"]) and not all_valid(["bkt"])
    assert not all_valid(["bkt/é"])  # valid, but non-ASCII batches go key by key
