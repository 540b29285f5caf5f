"""Event model: S3 event notifications (as AWS, MinIO and Ceph publish them), dataset releases,
and our own applied events. Parsing is pure; a message that fails validation raises EventError
with a short machine-readable reason, and the caller sends it to the dead-letter topic.

The mirror parses every event on its hot path, so the value types are msgspec Structs (built in
C, about ten times cheaper than frozen dataclasses) and JSON goes through msgspec; a message
msgspec refuses is parsed again by the standard library, so each bad message keeps the reason it
always had (a lone surrogate is a bad key, NaN a bad field), and only good messages are faster.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import quote_plus, unquote_plus

import msgspec

from xdc.errors import BadKey, EventError
from xdc.keys import check_key, is_bucket_name

SEQ_WIDTH = 40  # sequencers are right-padded to this width so they compare as strings
MAX_OBJECT_SIZE = 5 * 2**40  # S3's largest object; also keeps sizes inside SQLite's INTEGER
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z: datetime's (and our ISO output's) last second

RELEASE_TYPE = "dataset.released"
APPLIED_TYPE = "object.applied"


class ObjectEvent(msgspec.Struct, frozen=True):
    op: Literal["put", "delete"]
    bucket: str
    key: str  # decoded
    sequencer: str  # normalised (upper-case, right-padded)
    event_time: float  # epoch seconds
    size: int = 0
    etag: str = ""
    event_name: str = ""


@dataclass(frozen=True)
class ReleaseEvent:
    dataset: str
    version: str
    manifest: str  # URI or path of the file list
    time: float
    datacenters: tuple[str, ...] = ()
    deadline: float | None = None  # epoch seconds by which the dataset should be hot
    prefix: str | None = None  # keys of the list must stay under this bucket/prefix

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"type": RELEASE_TYPE, "dataset": self.dataset, "version": self.version,
                             "manifest": self.manifest, "time": iso(self.time),
                             "datacenters": list(self.datacenters)}
        if self.deadline is not None:
            d["deadline"] = iso(self.deadline)
        if self.prefix is not None:
            d["prefix"] = self.prefix
        return json.dumps(d).encode()


class AppliedEvent(msgspec.Struct, frozen=True):
    route: str
    op: str
    bucket: str
    key: str
    size: int
    etag: str
    sequencer: str
    event_time: float
    applied_time: float
    source: dict[str, str] = {}

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


class _AppliedMessage(msgspec.Struct):
    type: str
    records: list[AppliedEvent]


Event = ObjectEvent | ReleaseEvent

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def encode_applied(items: list[AppliedEvent]) -> bytes:
    """An applied message: the objects one mirror batch applied from one source partition, in order."""
    return _ENCODER.encode(_AppliedMessage(APPLIED_TYPE, items))


def parse_applied(value: bytes) -> list[AppliedEvent]:
    doc = json.loads(value)
    if not isinstance(doc, dict) or doc.get("type") != APPLIED_TYPE or not isinstance(doc.get("records"), list):
        raise EventError("bad_shape", "not an applied message")
    return [AppliedEvent(**r) for r in doc["records"]]


_HEX = re.compile(f"[0-9A-F]{{1,{SEQ_WIDTH}}}")


def normalise_sequencer(seq: str) -> str:
    """AWS: sequencers of one key compare as hex after right-padding the shorter with zeros."""
    s = seq.strip().upper()
    if _HEX.fullmatch(s) is None:
        raise EventError("bad_sequencer", repr(seq)[:80])
    return s.ljust(SEQ_WIDTH, "0")


def new_sequencer(t_ns: int | None = None) -> str:
    """A sequencer for events we publish ourselves (ingest, scan, resize): time-ordered."""
    return normalise_sequencer(format(t_ns if t_ns is not None else time.time_ns(), "020X"))


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# The form S3 and we publish ("2026-11-27T12:20:05.123Z"): its whole seconds are cached, since the
# events of one batch share a few seconds; any other form takes datetime's general parser.
_WHOLE_SECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
_SECONDS: dict[str, int] = {}


def _iso_z(value: str) -> float | None:
    if len(value) < 20 or value[-1] != "Z":
        return None
    whole = value[:19]
    sec = _SECONDS.get(whole)
    if sec is None:
        if _WHOLE_SECONDS.fullmatch(whole) is None:
            return None
        try:
            sec = int(datetime.fromisoformat(whole + "+00:00").timestamp())
        except (ValueError, OverflowError, OSError):
            return None  # the general parser says why
        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        _SECONDS[whole] = sec
    if len(value) == 20:
        return float(sec)
    frac = value[20:-1]
    if value[19] != "." or not 0 < len(frac) <= 6 or not (frac.isascii() and frac.isdigit()):
        return None
    # the same float as datetime's own timestamp(): whole microseconds over 10**6
    return (sec * 1_000_000 + int(frac.ljust(6, "0"))) / 1_000_000


def parse_time(value: Any, what: str = "eventTime") -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # huge ints overflow float(); inf/nan/negative times would poison lag metrics and iso()
        if not 0 <= value <= MAX_EPOCH:
            raise EventError("bad_time", f"{what} out of range")
        return float(value)
    if not isinstance(value, str):
        raise EventError("bad_time", f"{what} is not a timestamp")
    fast = _iso_z(value)
    if fast is not None and 0 <= fast <= MAX_EPOCH:
        return fast
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        raise EventError("bad_time", f"{what}={value[:40]!r}") from None
    if not 0 <= t <= MAX_EPOCH:
        raise EventError("bad_time", f"{what} out of range")
    return t


def validate_key(key: str, max_bytes: int = 1024) -> str:
    """The one key rule (xdc.keys.check_key), as an event error: keys are refused, not cleaned."""
    try:
        return check_key(key, max_bytes)
    except BadKey as exc:
        raise EventError("bad_key", f"{exc.reason}: {exc.detail}") from None


def parse_message(value: bytes, *, max_bytes: int = 1_048_576, max_key_bytes: int = 1024) -> list[Event]:
    """Parse one Kafka message: an S3 notification (one or more records) or a dataset release."""
    if value is None or len(value) == 0:
        raise EventError("empty", "empty message")
    if len(value) > max_bytes:
        raise EventError("too_large", f"{len(value)} bytes > {max_bytes}")
    try:
        doc = _DECODER.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        doc = _loads(value)  # the standard library's reading, and its reasons
    if not isinstance(doc, dict):
        raise EventError("bad_shape", f"top level is {type(doc).__name__}, not an object")
    if doc.get("type") == RELEASE_TYPE:
        return [parse_release(doc)]
    if doc.get("EventName") == "s3:TestEvent" or doc.get("Event") == "s3:TestEvent":
        return []  # AWS sends one when notifications are configured
    records = doc.get("Records")
    if not isinstance(records, list) or not records:
        raise EventError("bad_shape", "no Records[] and not a dataset release")
    return [parse_record(r, max_key_bytes) for r in records]


def _loads(value: bytes) -> Any:
    try:
        return json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." bombs
        raise EventError("bad_json", str(exc)[:200]) from None


_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]{1,255}")


def parse_record(rec: Any, max_key_bytes: int = 1024) -> ObjectEvent:
    if not isinstance(rec, dict):
        raise EventError("bad_shape", "record is not an object")
    name = rec.get("eventName")
    if not isinstance(name, str):
        raise EventError("bad_shape", "eventName missing")
    bare = name.removeprefix("s3:")  # MinIO/Ceph prefix it with s3:, AWS does not
    if bare.startswith("ObjectCreated:"):
        op: Literal["put", "delete"] = "put"
    elif bare.startswith("ObjectRemoved:"):
        op = "delete"
    else:
        raise EventError("unknown_event", name[:80])
    s3 = rec.get("s3")
    if not isinstance(s3, dict) or not isinstance(s3.get("bucket"), dict) or not isinstance(s3.get("object"), dict):
        raise EventError("bad_shape", "s3.bucket / s3.object missing")
    bucket = s3["bucket"].get("name")
    obj = s3["object"]
    raw_key = obj.get("key")
    if not isinstance(bucket, str) or not bucket or not isinstance(raw_key, str):
        raise EventError("bad_shape", "s3.bucket.name or s3.object.key missing")
    if not is_bucket_name(bucket):
        raise EventError("bad_shape", f"bucket name {bucket[:80]!r} is not a bucket name")
    key = validate_key(unquote_plus(raw_key), max_key_bytes)
    size = obj.get("size", 0)
    if op == "delete":
        size = 0  # S3 delete events carry no size; whatever is there is not ours to trust
    elif not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_OBJECT_SIZE:
        raise EventError("bad_shape", "s3.object.size is not an integer in [0, 5 TiB]")
    etag = obj.get("eTag") or obj.get("etag") or ""
    if not isinstance(etag, str) or len(etag) > 128 or (etag and not _PRINTABLE_ASCII.fullmatch(etag)):
        raise EventError("bad_shape", "eTag is not a short printable string")
    seq = obj.get("sequencer")
    if not isinstance(seq, str):
        raise EventError("bad_shape", "s3.object.sequencer missing")
    return ObjectEvent(op=op, bucket=bucket, key=key, sequencer=normalise_sequencer(seq),
                       event_time=parse_time(rec.get("eventTime")), size=int(size or 0),
                       etag=etag.strip('"'), event_name=name)


def parse_release(doc: dict[str, Any]) -> ReleaseEvent:
    def text(name: str) -> str:
        v = doc.get(name)
        if not isinstance(v, str) or not v.strip():
            raise EventError("bad_release", f"{name} missing")
        return v
    dcs = doc.get("datacenters") or []
    if not isinstance(dcs, list) or not all(isinstance(x, str) for x in dcs):
        raise EventError("bad_release", "datacenters must be a list of names")
    deadline = doc.get("deadline")
    prefix = doc.get("prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise EventError("bad_release", "prefix must be a string")
    return ReleaseEvent(dataset=text("dataset"), version=text("version"), manifest=text("manifest"),
                        time=parse_time(doc.get("time"), "time"), datacenters=tuple(dcs),
                        deadline=parse_time(deadline, "deadline") if deadline is not None else None,
                        prefix=prefix)


def s3_record(op: Literal["put", "delete"], bucket: str, key: str, *, size: int = 0, etag: str = "",
              sequencer: str | None = None, event_time: float | None = None, region: str = "us-east-1",
              event_name: str | None = None) -> dict[str, Any]:
    """One Records[] entry as AWS publishes it (URL-encoded key)."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/"),
                           "sequencer": (sequencer or new_sequencer()).rstrip("0") or "0"}
    if op == "put":
        obj.update(size=size, eTag=etag)
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": region,
        "eventTime": iso(event_time if event_time is not None else time.time()),
        "eventName": event_name or ("ObjectCreated:Put" if op == "put" else "ObjectRemoved:Delete"),
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
               "object": obj},
    }


def encode_notification(records: list[dict[str, Any]]) -> bytes:
    return json.dumps({"Records": records}).encode()


def message_key(bucket: str, key: str) -> bytes:
    """Kafka key: one object's events land in one partition, so they stay in order."""
    return f"{bucket}/{key}".encode()
