"""Event parsing and route key mapping: unit tests and hypothesis properties (pure, no servers).

The properties are what the mirror relies on to keep a bad message from stopping a partition:
parsing never raises anything but EventError, whatever the bytes; what it returns can be stored
(UTF-8, sizes inside SQLite's INTEGER, finite times); and a routed key never leaves its target prefix.
"""
from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from xdc.config import Route
from xdc.errors import EventError
from xdc.events import (
    MAX_OBJECT_SIZE,
    SEQ_WIDTH,
    ObjectEvent,
    encode_notification,
    normalise_sequencer,
    parse_message,
    parse_record,
    s3_record,
    validate_key,
)
from xdc.io.kafka import Record
from xdc.routing import route_event

REC = Record("t", 0, 0, None, b"", 0)
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _record(**obj: Any) -> dict[str, Any]:
    base = s3_record("put", "src-bucket", "camera/a.jpg", size=3, etag="0" * 32, sequencer="0A")
    base["s3"]["object"].update(obj)
    return base


def _one(rec: dict[str, Any]) -> ObjectEvent:
    (ev,) = parse_message(encode_notification([rec]))
    assert isinstance(ev, ObjectEvent)
    return ev


# -- unit: each hostile shape gets its reason -------------------------------------------------
@pytest.mark.parametrize("value, reason", [
    (b"", "empty"),
    (b"{not json", "bad_json"),
    (b"\xff\xfe\x00garbage", "bad_json"),
    (b"[" * 100_000, "bad_json"),  # nesting bomb: RecursionError inside json must not escape
    (b"[1, 2]", "bad_shape"),
    (b'"just a string"', "bad_shape"),
    (b'{"Records": "nope"}', "bad_shape"),
    (b'{"Records": []}', "bad_shape"),
    (b'{"Records": [42]}', "bad_shape"),
    (b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}', "bad_shape"),
    (b'{"Records": [{"eventName": "s3:ReducedRedundancyLostObject", "s3": {}}]}', "unknown_event"),
    (b'{"Records": [{"eventName": 7}]}', "bad_shape"),
])
def test_malformed_messages_have_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(EventError) as ei:
        parse_message(value)
    assert ei.value.reason == reason


def test_too_large_is_refused_before_parsing() -> None:
    with pytest.raises(EventError) as ei:
        parse_message(b" " * 2048, max_bytes=1024)
    assert ei.value.reason == "too_large"


@pytest.mark.parametrize("raw_key", [
    "camera/../lidar/x", "camera/%2e%2e/lidar/x", "camera%2F..%2Flidar%2Fx", "/etc/passwd", "%2Fetc%2Fpasswd",
    "camera/a%00b", "camera/a\x00b", "camera/a%0Ab", "camera/a\x7fb", "camera/./x", "camera\\..\\x",
    "camera/" + "k" * 1100, "",
])
def test_hostile_keys_are_refused(raw_key: str) -> None:
    rec = _record()
    rec["s3"]["object"]["key"] = raw_key  # as given: not re-encoded
    with pytest.raises(EventError) as ei:
        _one(rec)
    assert ei.value.reason in ("bad_key", "bad_shape")


@pytest.mark.parametrize("obj, reason", [
    ({"size": -1}, "bad_shape"), ({"size": True}, "bad_shape"), ({"size": "3"}, "bad_shape"),
    ({"size": MAX_OBJECT_SIZE + 1}, "bad_shape"), ({"size": 10**30}, "bad_shape"),
    ({"eTag": ["x"]}, "bad_shape"), ({"eTag": "a\nb"}, "bad_shape"), ({"eTag": "e" * 200}, "bad_shape"),
    ({"sequencer": "XYZ"}, "bad_sequencer"), ({"sequencer": "1" * 41}, "bad_sequencer"),
    ({"sequencer": None}, "bad_shape"),
])
def test_bad_object_fields(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(EventError) as ei:
        _one(_record(**obj))
    assert ei.value.reason == reason


@pytest.mark.parametrize("t", [10**400, -1, float("inf"), float("nan"), "yesterday", "99999-01-01T00:00:00Z", None])
def test_bad_event_time(t: Any) -> None:
    rec = _record()
    rec["eventTime"] = t
    with pytest.raises(EventError) as ei:
        parse_message(json.dumps({"Records": [rec]}).encode())
    assert ei.value.reason == "bad_time"


def test_lone_surrogate_key_is_refused() -> None:
    msg = encode_notification([_record()]).replace(b"camera/a.jpg", b"camera/\\ud800.jpg")
    with pytest.raises(EventError) as ei:
        parse_message(msg)
    assert ei.value.reason == "bad_key"


def test_delete_ignores_a_junk_size() -> None:
    rec = s3_record("delete", "src-bucket", "camera/a.jpg", sequencer="0B")
    rec["s3"]["object"]["size"] = "abc"
    ev = _one(rec)
    assert ev.op == "delete" and ev.size == 0


def test_test_event_is_ignored_and_minio_prefix_accepted() -> None:
    assert parse_message(b'{"Event": "s3:TestEvent"}') == []
    ev = _one(_record() | {"eventName": "s3:ObjectCreated:CompleteMultipartUpload"})
    assert ev.op == "put"


# -- properties ------------------------------------------------------------------------------
json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=20)


def _check_storable(events: list[Any]) -> None:
    for ev in events:
        if isinstance(ev, ObjectEvent):
            ev.key.encode("utf-8")
            ev.bucket.encode("utf-8")
            ev.etag.encode("ascii")
            assert 0 <= ev.size <= MAX_OBJECT_SIZE < 2**63
            assert math.isfinite(ev.event_time)
            assert len(ev.sequencer) == SEQ_WIDTH


@PROPS
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_event_error(value: bytes) -> None:
    try:
        _check_storable(parse_message(value))
    except EventError:
        pass


@PROPS
@given(json_value)
def test_any_json_parses_or_raises_event_error(doc: Any) -> None:
    try:
        _check_storable(parse_message(json.dumps(doc).encode()))
    except EventError:
        pass


FIELDS = [("eventName",), ("eventTime",), ("s3",), ("s3", "bucket"), ("s3", "bucket", "name"), ("s3", "object"),
          ("s3", "object", "key"), ("s3", "object", "size"), ("s3", "object", "eTag"), ("s3", "object", "sequencer")]


@PROPS
@given(st.sampled_from(FIELDS), json_value | st.just("__delete__"), st.sampled_from(["put", "delete"]))
def test_a_valid_record_with_one_field_mutated_parses_or_raises_event_error(
        path: tuple[str, ...], value: Any, op: str) -> None:
    rec = s3_record(op, "src-bucket", "camera/a.jpg", size=3, etag="0" * 32, sequencer="0A")  # type: ignore[arg-type]
    node: Any = rec
    for p in path[:-1]:
        node = node[p]
    if value == "__delete__":
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    try:
        _check_storable(parse_message(json.dumps(rec).encode()))
    except EventError:
        pass


segment = st.text(st.characters(min_codepoint=0x20, blacklist_characters="/\\",
                                blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)
valid_key = st.lists(segment, min_size=1, max_size=6).map("/".join).filter(
    lambda k: all(p not in (".", "..") for p in k.split("/")) and len(k.encode()) <= 1024)


@PROPS
@given(valid_key, st.integers(0, MAX_OBJECT_SIZE), st.text("0123456789abcdef", min_size=32, max_size=32),
       st.integers(1, 2**128), st.sampled_from(["put", "delete"]))
def test_s3_record_round_trips(key: str, size: int, etag: str, seq: int, op: str) -> None:
    seq_hex = format(seq, "X")
    assume(len(seq_hex) <= SEQ_WIDTH)
    ev = _one(s3_record(op, "src-bucket", key, size=size, etag=etag, sequencer=seq_hex))  # type: ignore[arg-type]
    assert (ev.op, ev.bucket, ev.key) == (op, "src-bucket", key)
    assert ev.sequencer == normalise_sequencer(seq_hex)
    if op == "put":
        assert (ev.size, ev.etag) == (size, etag)
    assert validate_key(ev.key) == key


prefix = st.lists(st.text("abcxyz-_.", min_size=1, max_size=5).filter(lambda s: s not in (".", "..")),
                  max_size=3).map(lambda parts: "".join(p + "/" for p in parts))


@PROPS
@given(prefix, prefix, valid_key)
def test_routed_keys_stay_under_the_target_prefix(src_prefix: str, dst_prefix: str, key: str) -> None:
    route = Route.model_validate({"source": {"dc": "A", "bucket": "src-bucket", "prefix": src_prefix},
                                  "target": {"dc": "B", "bucket": "dst-bucket", "prefix": dst_prefix}})
    ev = ObjectEvent("put", "src-bucket", key, normalise_sequencer("1"), 0.0, 1, "e")
    try:
        routed = route_event(ev, [route], REC)
    except EventError:
        return  # e.g. the mapped key got too long: refused, never written
    if not key.startswith(src_prefix):
        assert routed is None
        return
    assert routed is not None
    assert routed.target_bucket == "dst-bucket"
    assert routed.target_key.startswith(dst_prefix)
    assert routed.target_key[len(dst_prefix):] == key[len(src_prefix):]
    validate_key(routed.target_key)


def test_unicode_lookalike_prefixes_do_not_route() -> None:
    route = Route.model_validate({"source": {"dc": "A", "bucket": "src-bucket", "prefix": "camera/"},
                                  "target": {"dc": "B", "bucket": "dst-bucket", "prefix": "mirror/camera/"}})
    for key in ["camera\uff0fx.jpg", "cam\u0435ra/x.jpg", "camera\u2215x.jpg", "Camera/x.jpg", "camera"]:
        ev = ObjectEvent("put", "src-bucket", key, normalise_sequencer("1"), 0.0, 1, "e")
        assert route_event(ev, [route], REC) is None
    ev = ObjectEvent("put", "other-bucket", "camera/x.jpg", normalise_sequencer("1"), 0.0, 1, "e")
    assert route_event(ev, [route], REC) is None


def test_parse_record_rejects_non_dicts() -> None:
    for bad in (None, [], "x", 3):
        with pytest.raises(EventError):
            parse_record(bad)
