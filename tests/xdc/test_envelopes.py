"""Envelopes (EventBridge, SNS, SQS) and event families: unwrapped and classified into one event
model (pure, no servers). Expected values are written out from AWS's documented shapes."""
from __future__ import annotations

import json

import msgspec
import pytest

from tests.support import eventbridge_event, sns_wrapped, sqs_wrapped
from xdc.errors import EventError
from xdc.events import (
    IgnoredEvent,
    ObjectEvent,
    encode_notification,
    normalise_sequencer,
    parse_message,
    reconcile_record,
    s3_record,
)

ETAG = "b1946ac92492d2347c6235b4d2611184"
NATIVE = encode_notification([s3_record("put", "src-bucket", "camera/a b+c.jpg", size=5, etag=ETAG,
                                        sequencer="0055AED6DCD90281E5", event_time=1_700_000_000.0)])


def _one(value: bytes) -> ObjectEvent | IgnoredEvent:
    (ev,) = parse_message(value)
    assert isinstance(ev, ObjectEvent | IgnoredEvent)
    return ev


# -- families ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, op", [
    ("ObjectCreated:Put", "put"), ("s3:ObjectCreated:CompleteMultipartUpload", "put"), ("ObjectCreated:Copy", "put"),
    ("ObjectRemoved:Delete", "delete"), ("ObjectRemoved:DeleteMarkerCreated", "delete"),
    ("LifecycleExpiration:Delete", "delete"), ("LifecycleExpiration:DeleteMarkerCreated", "delete"),
    ("s3:LifecycleExpiration:Delete", "delete"),
    ("ObjectTagging:Put", "tags"), ("ObjectTagging:Delete", "tags"), ("s3:ObjectTagging:Put", "tags"),
    ("ObjectAcl:Put", "acl"),
])
def test_families_that_change_the_object(name: str, op: str) -> None:
    rec = s3_record("put", "src-bucket", "camera/x", size=3, etag=ETAG, sequencer="0A", event_name=name)
    ev = _one(encode_notification([rec]))
    assert isinstance(ev, ObjectEvent)
    assert (ev.op, ev.event_name, ev.key, ev.origin) == (op, name, "camera/x", "s3")
    assert ev.size == (3 if op == "put" else 0)  # only creations carry a size


@pytest.mark.parametrize("name, reason", [
    ("ObjectRestore:Post", "restore"), ("ObjectRestore:Completed", "restore"), ("ObjectRestore:Delete", "restore"),
    ("s3:ObjectRestore:Post", "restore"), ("Replication:OperationFailedReplication", "replication"),
    ("Replication:OperationMissedThreshold", "replication"), ("LifecycleTransition", "transition"),
    ("IntelligentTiering", "tiering"), ("s3:ObjectTransition:Complete", "transition"),
    ("s3:ObjectAccessed:Get", "accessed"),
])
def test_families_ignored_by_design(name: str, reason: str) -> None:
    rec = s3_record("put", "src-bucket", "camera/x", sequencer="0A", event_name=name)
    ev = _one(encode_notification([rec]))
    assert ev == IgnoredEvent(reason, name, "src-bucket", "camera/x")


def test_an_ignored_family_with_a_broken_key_is_still_ignored_not_dead_lettered() -> None:
    rec = s3_record("put", "src-bucket", "camera/x", sequencer="0A", event_name="ObjectRestore:Completed")
    rec["s3"]["object"]["key"] = "../../etc/passwd"
    del rec["s3"]["object"]["sequencer"]
    assert _one(encode_notification([rec])) == IgnoredEvent("restore", "ObjectRestore:Completed")


@pytest.mark.parametrize("name", ["ReducedRedundancyLostObject", "s3:ObjectCreated", "Object Created",
                                  "s3:Scanner:ManyVersions", "objectcreated:put"])
def test_unknown_families_are_dead_lettered(name: str) -> None:
    rec = s3_record("put", "src-bucket", "camera/x", sequencer="0A", event_name=name)
    with pytest.raises(EventError) as ei:
        parse_message(encode_notification([rec]))
    assert ei.value.reason == "unknown_event"


def test_tag_events_may_come_without_a_sequencer_but_puts_may_not() -> None:
    rec = s3_record("tags", "src-bucket", "camera/x", sequencer="0A")
    del rec["s3"]["object"]["sequencer"]
    ev = _one(encode_notification([rec]))
    assert isinstance(ev, ObjectEvent) and ev.op == "tags" and ev.sequencer == ""
    rec = s3_record("put", "src-bucket", "camera/x", sequencer="0A")
    del rec["s3"]["object"]["sequencer"]
    with pytest.raises(EventError) as ei:
        parse_message(encode_notification([rec]))
    assert ei.value.reason == "bad_shape"


def test_reconciliations_carry_no_sequencer() -> None:
    ev = _one(encode_notification([reconcile_record("put", "src-bucket", "camera/x", size=4, etag=ETAG)]))
    assert isinstance(ev, ObjectEvent)
    assert (ev.origin, ev.reconcile, ev.sequencer, ev.op, ev.size, ev.etag) == ("reconcile", True, "", "put", 4, ETAG)
    raw = json.loads(encode_notification([reconcile_record("delete", "src-bucket", "camera/x")]))
    assert raw["Records"][0]["eventSource"] == "xdc:reconcile" and "sequencer" not in raw["Records"][0]["s3"]["object"]


# -- envelopes -----------------------------------------------------------------------------------
def test_native_shape_is_the_reference() -> None:
    ev = _one(NATIVE)
    assert isinstance(ev, ObjectEvent)
    assert (ev.key, ev.size, ev.etag, ev.sequencer, ev.envelope) == (
        "camera/a b+c.jpg", 5, ETAG, normalise_sequencer("0055AED6DCD90281E5"), "")


@pytest.mark.parametrize("wrap, envelope", [
    (sns_wrapped, "sns"),
    (sqs_wrapped, "sqs"),
    (lambda b: sqs_wrapped(b, "Body"), "sqs"),
    (lambda b: sqs_wrapped(b, "MessageBody"), "sqs"),
    (lambda b: sqs_wrapped(sns_wrapped(b)), "sqs/sns"),  # S3 -> SNS -> SQS fan-out
    (lambda b: json.dumps({"Records": [{"eventSource": "aws:sqs", "body": b.decode()}]}).encode(), "sqs"),
    (lambda b: json.dumps({"Records": [{"EventSource": "aws:sns", "Sns": {"Message": b.decode()}}]}).encode(), "sns"),
])
def test_wrapped_notifications_give_the_same_event(wrap, envelope: str) -> None:  # type: ignore[no-untyped-def]
    native = _one(NATIVE)
    ev = _one(wrap(NATIVE))
    assert ev == msgspec.structs.replace(native, envelope=envelope)


def test_eventbridge_object_created_matches_the_native_event() -> None:
    eb = eventbridge_event("Object Created", "src-bucket", "camera/a b+c.jpg", seq="0055AED6DCD90281E5", size=5,
                           etag=ETAG, reason="PutObject", t=1_700_000_000.0)
    ev = _one(json.dumps(eb).encode())
    native = _one(NATIVE)
    assert ev == msgspec.structs.replace(native, envelope="eventbridge")
    # and through SQS (EventBridge rule -> SQS queue -> connector)
    assert _one(sqs_wrapped(json.dumps(eb).encode())).envelope == "sqs/eventbridge"  # type: ignore[union-attr]


@pytest.mark.parametrize("detail_type, reason, deletion, expect", [
    ("Object Created", "CompleteMultipartUpload", "", ("put", "ObjectCreated:CompleteMultipartUpload")),
    ("Object Created", "CopyObject", "", ("put", "ObjectCreated:Copy")),
    ("Object Deleted", "DeleteObject", "Permanently Deleted", ("delete", "ObjectRemoved:Delete")),
    ("Object Deleted", "DeleteObject", "Delete Marker Created", ("delete", "ObjectRemoved:DeleteMarkerCreated")),
    ("Object Deleted", "Lifecycle Expiration", "Permanently Deleted", ("delete", "LifecycleExpiration:Delete")),
    ("Object Deleted", "Lifecycle Expiration", "Delete Marker Created",
     ("delete", "LifecycleExpiration:DeleteMarkerCreated")),
    ("Object Tags Added", "", "", ("tags", "ObjectTagging:Put")),
    ("Object Tags Deleted", "", "", ("tags", "ObjectTagging:Delete")),
    ("Object ACL Updated", "", "", ("acl", "ObjectAcl:Put")),
    ("Object Restore Completed", "", "", ("ignored", "restore")),
    ("Object Storage Class Changed", "", "", ("ignored", "transition")),
    ("Object Access Tier Changed", "", "", ("ignored", "tiering")),
])
def test_eventbridge_detail_types(detail_type: str, reason: str, deletion: str, expect: tuple[str, str]) -> None:
    size = 7 if detail_type == "Object Created" else None
    eb = eventbridge_event(detail_type, "src-bucket", "camera/x", seq="617f08299329d189", size=size,
                           etag=ETAG if size else None, reason=reason, deletion_type=deletion)
    ev = _one(json.dumps(eb).encode())
    if expect[0] == "ignored":
        assert isinstance(ev, IgnoredEvent) and ev.reason == expect[1] and ev.envelope == "eventbridge"
        return
    assert isinstance(ev, ObjectEvent)
    assert (ev.op, ev.event_name, ev.bucket, ev.key) == (expect[0], expect[1], "src-bucket", "camera/x")
    assert ev.sequencer == normalise_sequencer("617f08299329d189")


def test_unknown_eventbridge_type_is_dead_lettered() -> None:
    eb = eventbridge_event("Object Teleported", "src-bucket", "camera/x", seq="01")
    with pytest.raises(EventError) as ei:
        parse_message(json.dumps(eb).encode())
    assert ei.value.reason == "unknown_event"


@pytest.mark.parametrize("value, reason", [
    (json.dumps({"Type": "Notification", "Message": "{not json"}).encode(), "bad_json"),
    (json.dumps({"Type": "Notification", "Message": 42}).encode(), "bad_shape"),
    (json.dumps({"body": "[1, 2]"}).encode(), "bad_shape"),
    (json.dumps({"body": json.dumps({"hello": 1})}).encode(), "bad_shape"),
    (json.dumps({"detail-type": "Object Created", "detail": {"bucket": {}, "object": {}}}).encode(), "bad_shape"),
])
def test_broken_envelopes_have_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(EventError) as ei:
        parse_message(value)
    assert ei.value.reason == reason


def test_envelopes_nested_too_deep_are_refused() -> None:
    value = NATIVE
    for _ in range(6):
        value = sqs_wrapped(value)
    with pytest.raises(EventError) as ei:
        parse_message(value)
    assert ei.value.reason == "bad_shape"


def test_a_test_event_inside_an_envelope_gives_nothing() -> None:
    assert parse_message(sns_wrapped(b'{"Service": "Amazon S3", "Event": "s3:TestEvent"}')) == []
