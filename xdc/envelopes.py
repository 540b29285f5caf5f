"""S3 notifications as they reach Kafka in practice: unwrapped here, in one place, into native records.

    native        {"Records": [{eventName, eventTime, s3: {bucket, object}}, ...]}    (AWS, MinIO, Ceph)
    EventBridge   {"detail-type": "Object Created", "source": "aws.s3", "time", "detail": {bucket,
                   object: {key, size, etag, sequencer}, reason, deletion-type}}
    SNS           {"Type": "Notification", "Message": "<the S3 JSON as a string>"}
                  (or a Lambda-style {"Records": [{"EventSource": "aws:sns", "Sns": {"Message": ...}}]})
    SQS           a connector's record whose body field holds the JSON: {"body" | "Body" |
                  "messageBody" | "MessageBody": "..."}, or {"Records": [{"eventSource": "aws:sqs",
                  "body": ...}]}; the body may itself be SNS or EventBridge (fan-out)

`unwrap` returns the native records and the envelope path ("" native, "eventbridge", "sns",
"sqs/sns", ...), which the event keeps for the trace. EventBridge records are rewritten into the
native shape (same sequencer, size, ETag and URL-encoded key), so one parser validates them all.
"""
from __future__ import annotations

import json
from typing import Any

from xdc.errors import EventError

MAX_DEPTH = 4  # envelopes inside envelopes (SQS <- SNS <- S3) stop here: a nesting bomb is bad_shape
_BODY_FIELDS = ("body", "Body", "messageBody", "MessageBody")

# EventBridge detail-type (+ reason / deletion-type) -> the native eventName
_EB_NAMES = {
    "Object Restore Initiated": "ObjectRestore:Post",
    "Object Restore Completed": "ObjectRestore:Completed",
    "Object Restore Expired": "ObjectRestore:Delete",
    "Object Tags Added": "ObjectTagging:Put",
    "Object Tags Deleted": "ObjectTagging:Delete",
    "Object ACL Updated": "ObjectAcl:Put",
    "Object Storage Class Changed": "LifecycleTransition",
    "Object Access Tier Changed": "IntelligentTiering",
}
_EB_CREATED = {"PutObject": "Put", "POST Object": "Post", "CopyObject": "Copy",
               "CompleteMultipartUpload": "CompleteMultipartUpload"}


def unwrap(doc: dict[str, Any], depth: int = 0) -> tuple[list[Any], str]:
    """The native S3 records inside `doc` and the envelope path; EventError when it is none of them.
    An S3 test event (sent when notifications are configured) gives no records."""
    if depth > MAX_DEPTH:
        raise EventError("bad_shape", "envelopes nested too deep")
    if doc.get("Event") == "s3:TestEvent" or doc.get("EventName") == "s3:TestEvent":
        return [], ""
    records = doc.get("Records")
    if isinstance(records, list) and records:
        first = records[0]
        if isinstance(first, dict) and first.get("eventSource") == "aws:sqs" and "body" in first:
            return _each(records, "sqs", lambda r: r.get("body"), depth)
        if isinstance(first, dict) and first.get("EventSource") == "aws:sns" and isinstance(first.get("Sns"), dict):
            return _each(records, "sns", lambda r: (r.get("Sns") or {}).get("Message"), depth)
        return records, ""
    if doc.get("Type") == "Notification" and "Message" in doc:
        inner, path = unwrap(_inner(doc["Message"], "SNS Message"), depth + 1)
        return inner, _join("sns", path)
    if "detail-type" in doc and isinstance(doc.get("detail"), dict):
        return [eventbridge_record(doc)], "eventbridge"
    for f in _BODY_FIELDS:
        if f in doc:
            inner, path = unwrap(_inner(doc[f], f"SQS {f}"), depth + 1)
            return inner, _join("sqs", path)
    raise EventError("bad_shape", "no Records[], no known envelope and not a dataset release")


def _each(records: list[Any], kind: str, body: Any, depth: int) -> tuple[list[Any], str]:
    out: list[Any] = []
    paths = set()
    for r in records:
        if not isinstance(r, dict):
            raise EventError("bad_shape", f"{kind} record is not an object")
        inner, path = unwrap(_inner(body(r), f"{kind} record body"), depth + 1)
        out.extend(inner)
        paths.add(path)
    return out, _join(kind, sorted(paths)[0] if len(paths) == 1 else "mixed")


def _inner(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value  # some connectors deserialise the body already
    if not isinstance(value, str):
        raise EventError("bad_shape", f"{what} is not a JSON string")
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise EventError("bad_json", f"{what}: {str(exc)[:150]}") from None
    if not isinstance(doc, dict):
        raise EventError("bad_shape", f"{what} is not a JSON object")
    return doc


def _join(outer: str, inner: str) -> str:
    return f"{outer}/{inner}" if inner else outer


def eventbridge_record(doc: dict[str, Any]) -> dict[str, Any]:
    """An EventBridge S3 event as the native record it stands for (the parser validates it)."""
    d = doc["detail"]
    kind = doc.get("detail-type")
    if not isinstance(kind, str):
        raise EventError("bad_shape", "EventBridge detail-type is not a string")
    reason = d.get("reason") if isinstance(d.get("reason"), str) else ""
    marker = d.get("deletion-type") == "Delete Marker Created"
    if kind == "Object Created":
        name = "ObjectCreated:" + _EB_CREATED.get(reason, "Put")
    elif kind == "Object Deleted":
        base = "LifecycleExpiration:" if reason == "Lifecycle Expiration" else "ObjectRemoved:"
        name = base + ("DeleteMarkerCreated" if marker else "Delete")
    else:
        name = _EB_NAMES.get(kind, f"EventBridge:{kind[:60]}")  # unknown: the parser dead-letters it
    obj = d.get("object") if isinstance(d.get("object"), dict) else {}
    native_obj: dict[str, Any] = {"key": obj.get("key")}
    for src, dst in (("size", "size"), ("etag", "eTag"), ("sequencer", "sequencer"), ("version-id", "versionId")):
        if src in obj:
            native_obj[dst] = obj[src]
    bucket = d.get("bucket") if isinstance(d.get("bucket"), dict) else {}
    return {"eventSource": "aws:s3", "eventTime": doc.get("time"), "eventName": name,
            "awsRegion": doc.get("region"), "s3": {"bucket": {"name": bucket.get("name")}, "object": native_obj}}
