"""Event model: S3 event notifications (as AWS, MinIO and Ceph publish them, natively or inside an
EventBridge, SNS or SQS envelope: `xdc.envelopes`), dataset releases, and our own applied events.
Parsing is pure; a message that fails validation raises EventError with a short machine-readable
reason, and the caller sends it to the dead-letter topic.

Event families, by the name's prefix (MinIO and Ceph add "s3:"):

    ObjectCreated:*, ObjectRemoved:*          put, delete
    LifecycleExpiration:Delete|DeleteMarkerCreated   delete (an expiry is a delete)
    ObjectTagging:Put|Delete, ObjectAcl:Put   tags, acl (the object's metadata changed)
    ObjectRestore:*, Replication:*, LifecycleTransition, IntelligentTiering,
    ObjectTransition:* and ObjectAccessed:* (MinIO)     ignored by design (IgnoredEvent, counted)
    anything else                             unknown_event (dead-lettered)

Two origins: an S3 event (`origin="s3"`) carries the store's sequencer, which orders it against
the other S3 events of its key; a reconciliation (`origin="reconcile"`, made by scan, verify
--repair, the gap healer or ingest into a store without notifications) carries none: its apply
reads the source's current state instead (see mirror/apply.py).

The mirror parses every event on its hot path, so the object and applied events are msgspec
Structs (built in C, about ten times cheaper than frozen dataclasses) and JSON goes through
msgspec; a message msgspec refuses is parsed again by the standard library, so each bad message
keeps the reason it always had (a lone surrogate is a bad key, NaN a bad field), and only good
messages are faster.
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

from xdc.envelopes import unwrap
from xdc.errors import BadKey, EventError
from xdc.keys import check_key, is_bucket_name

SEQ_WIDTH = 40  # sequencers are right-padded to this width so they compare as strings
MAX_OBJECT_SIZE = 5 * 2**40  # S3's largest object; also keeps sizes inside SQLite's INTEGER
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z: datetime's (and our ISO output's) last second

RELEASE_TYPE = "dataset.released"
READY_TYPE = "dataset.ready"  # a dataset version is 100 % cached in a datacenter (on the releases topic)
APPLIED_TYPE = "object.applied"
MAX_ROOTS = 256  # per-modality roots a release may carry


Op = Literal["put", "delete", "tags", "acl"]
Origin = Literal["s3", "reconcile"]
RECONCILE_SOURCE = "xdc:reconcile"  # eventSource of the events the project makes itself

# family (bare event name prefix) -> op, or the reason it is ignored by design
_FAMILIES: tuple[tuple[str, str], ...] = (
    ("ObjectCreated:", "put"), ("ObjectRemoved:", "delete"), ("LifecycleExpiration:", "delete"),
    ("ObjectTagging:", "tags"), ("ObjectAcl:", "acl"),
    ("ObjectRestore:", "ignore:restore"), ("Replication:", "ignore:replication"),
    ("LifecycleTransition", "ignore:transition"), ("ObjectTransition:", "ignore:transition"),
    ("IntelligentTiering", "ignore:tiering"), ("ObjectAccessed:", "ignore:accessed"),
)
IGNORED_FAMILIES = tuple(sorted({f.removeprefix("ignore:") for _, f in _FAMILIES if f.startswith("ignore:")}))


def family_of(event_name: str) -> str | None:
    """"put", "delete", "tags", "acl", "ignore:<reason>", or None for an unknown family."""
    bare = event_name.removeprefix("s3:")
    for prefix, fam in _FAMILIES:
        if bare.startswith(prefix):
            return fam
    return None


class ObjectEvent(msgspec.Struct, frozen=True):
    op: Op
    bucket: str
    key: str  # decoded
    sequencer: str  # normalised (upper-case, right-padded); "" for a reconciliation
    event_time: float  # epoch seconds
    size: int = 0
    etag: str = ""
    event_name: str = ""
    origin: Origin = "s3"
    envelope: str = ""  # "" (native), "eventbridge", "sns", "sqs", "sqs/sns", ...

    @property
    def reconcile(self) -> bool:
        return self.origin == "reconcile"


@dataclass(frozen=True)
class IgnoredEvent:
    """An S3 event of a family the mirror ignores by design (restore, replication, transition,
    tiering, accessed): counted by reason, never dead-lettered. bucket/key when they are usable."""

    reason: str
    event_name: str
    bucket: str = ""
    key: str = ""
    envelope: str = ""


@dataclass(frozen=True)
class ReleaseEvent:
    dataset: str
    version: str
    manifest: str  # URI or path of the file list
    time: float
    datacenters: tuple[str, ...] = ()
    deadline: float | None = None  # epoch seconds by which the dataset should be hot
    prefix: str | None = None  # keys of the list must stay under this bucket/prefix
    select: str | None = None  # where the paths are in a dataset index (JMESPath, or csv/parquet columns)
    root: str | dict[str, str] | None = None  # joined to relative paths: a prefix, or {"": base, TAG: prefix}
    make_room: bool = False  # free retired datasets when the warm would pass a node's high watermark

    def to_dict(self) -> dict[str, Any]:
        """The release document (what `parse_release` reads back)."""
        d: dict[str, Any] = {"type": RELEASE_TYPE, "dataset": self.dataset, "version": self.version,
                             "manifest": self.manifest, "time": iso(self.time),
                             "datacenters": list(self.datacenters)}
        if self.deadline is not None:
            d["deadline"] = iso(self.deadline)
        for name in ("prefix", "select", "root"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.make_room:
            d["make_room"] = True
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


@dataclass(frozen=True)
class ReadyEvent:
    """A dataset version became 100 % cached in a datacenter (published once per transition)."""

    dataset: str
    version: str
    dc: str
    files: int
    bytes: int
    cached_ratio: float
    time: float
    manifest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": READY_TYPE, "dataset": self.dataset, "version": self.version, "dc": self.dc,
                "files": self.files, "bytes": self.bytes, "cached_ratio": self.cached_ratio,
                "time": iso(self.time), "manifest": self.manifest}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


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


Event = ObjectEvent | IgnoredEvent | ReleaseEvent | ReadyEvent

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
    """Parse one Kafka message: an S3 notification (one or more records, natively or in an
    EventBridge / SNS / SQS envelope) or a dataset release."""
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
    if doc.get("type") == READY_TYPE:
        return [parse_ready(doc)]
    records, envelope = unwrap(doc)
    return [parse_record(r, max_key_bytes, envelope=envelope) for r in records]


def _loads(value: bytes) -> Any:
    try:
        return json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." bombs
        raise EventError("bad_json", str(exc)[:200]) from None


_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]{1,255}")


def parse_record(rec: Any, max_key_bytes: int = 1024, *, envelope: str = "") -> ObjectEvent | IgnoredEvent:
    if not isinstance(rec, dict):
        raise EventError("bad_shape", "record is not an object")
    name = rec.get("eventName")
    if not isinstance(name, str):
        raise EventError("bad_shape", "eventName missing")
    fam = family_of(name)
    if fam is None:
        raise EventError("unknown_event", name[:80])
    if fam.startswith("ignore:"):
        return _ignored(rec, name, fam.removeprefix("ignore:"), max_key_bytes, envelope)
    op: Op = fam  # type: ignore[assignment]
    origin: Origin = "reconcile" if rec.get("eventSource") == RECONCILE_SOURCE else "s3"
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
    if op != "put":
        size = 0  # only creations carry a size; whatever is there is not ours to trust
    elif not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_OBJECT_SIZE:
        raise EventError("bad_shape", "s3.object.size is not an integer in [0, 5 TiB]")
    etag = obj.get("eTag") or obj.get("etag") or ""
    if not isinstance(etag, str) or len(etag) > 128 or (etag and not _PRINTABLE_ASCII.fullmatch(etag)):
        raise EventError("bad_shape", "eTag is not a short printable string")
    seq = obj.get("sequencer")
    if origin == "reconcile" or (seq is None and op in ("tags", "acl")):
        sequencer = ""  # reconciliations are not ordered by sequencer; tag/ACL events may lack one
    elif not isinstance(seq, str):
        raise EventError("bad_shape", "s3.object.sequencer missing")
    else:
        sequencer = normalise_sequencer(seq)
    return ObjectEvent(op=op, bucket=bucket, key=key, sequencer=sequencer,
                       event_time=parse_time(rec.get("eventTime")), size=int(size or 0),
                       etag=etag.strip('"') if op == "put" else "", event_name=name, origin=origin,
                       envelope=envelope)


def _ignored(rec: dict[str, Any], name: str, reason: str, max_key_bytes: int, envelope: str) -> IgnoredEvent:
    """An event ignored by design; its bucket and key are kept when they are usable (for the
    route label of the count), never validated into an error: it is not applied anyway."""
    s3 = rec.get("s3") if isinstance(rec.get("s3"), dict) else {}
    bucket = (s3.get("bucket") or {}).get("name") if isinstance(s3.get("bucket"), dict) else None
    raw = (s3.get("object") or {}).get("key") if isinstance(s3.get("object"), dict) else None
    key = ""
    if isinstance(bucket, str) and is_bucket_name(bucket) and isinstance(raw, str):
        try:
            key = validate_key(unquote_plus(raw), max_key_bytes)
        except EventError:
            key = ""
    else:
        bucket = ""
    return IgnoredEvent(reason, name[:80], bucket if key else "", key, envelope)


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
    for name in ("prefix", "select"):
        if doc.get(name) is not None and (not isinstance(doc[name], str) or not doc[name].strip()):
            raise EventError("bad_release", f"{name} must be a non-empty string")
    make_room = doc.get("make_room", False)
    if not isinstance(make_room, bool):
        raise EventError("bad_release", "make_room must be true or false")
    return ReleaseEvent(dataset=text("dataset"), version=text("version"), manifest=text("manifest"),
                        time=parse_time(doc.get("time"), "time"), datacenters=tuple(dcs),
                        deadline=parse_time(deadline, "deadline") if deadline is not None else None,
                        prefix=doc.get("prefix"), select=doc.get("select"), root=_root(doc.get("root")),
                        make_room=make_room)


def _root(value: Any) -> str | dict[str, str] | None:
    """A release's root: "s3://bucket/prefix", or {"": base, TAG: prefix} (per-modality roots).
    Only the shape is checked here; the file-list reader checks the prefixes themselves."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    if (isinstance(value, dict) and 0 < len(value) <= MAX_ROOTS
            and all(isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items())):
        return dict(value)
    raise EventError("bad_release", f"root must be a prefix or a map of at most {MAX_ROOTS} tag -> prefix")


def parse_ready(doc: dict[str, Any]) -> ReadyEvent:
    """A `dataset.ready` message (what xdc publishes when a version is 100 % cached somewhere)."""
    try:
        return ReadyEvent(dataset=str(doc["dataset"]), version=str(doc["version"]), dc=str(doc["dc"]),
                          files=int(doc["files"]), bytes=int(doc["bytes"]), cached_ratio=float(doc["cached_ratio"]),
                          time=parse_time(doc.get("time"), "time"), manifest=doc.get("manifest"))
    except (KeyError, TypeError, ValueError) as exc:
        raise EventError("bad_shape", f"dataset.ready: {exc}") from None


def s3_record(op: Op, bucket: str, key: str, *, size: int = 0, etag: str = "",
              sequencer: str | None = None, event_time: float | None = None, region: str = "us-east-1",
              event_name: str | None = None, origin: Origin = "s3") -> dict[str, Any]:
    """One Records[] entry as AWS publishes it (URL-encoded key). A reconciliation (`origin=
    "reconcile"`) has eventSource "xdc:reconcile" and no sequencer."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/")}
    if origin == "s3":
        obj["sequencer"] = (sequencer or new_sequencer()).rstrip("0") or "0"
    if op == "put":
        obj.update(size=size, eTag=etag)
    default_name = {"put": "ObjectCreated:Put", "delete": "ObjectRemoved:Delete", "tags": "ObjectTagging:Put",
                    "acl": "ObjectAcl:Put"}[op]
    return {
        "eventVersion": "2.1", "eventSource": RECONCILE_SOURCE if origin == "reconcile" else "aws:s3",
        "awsRegion": region, "eventTime": iso(event_time if event_time is not None else time.time()),
        "eventName": event_name or default_name,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
               "object": obj},
    }


def reconcile_record(op: Literal["put", "delete"], bucket: str, key: str, *, region: str = "us-east-1",
                     size: int = 0, etag: str = "", event_time: float | None = None) -> dict[str, Any]:
    """A reconciliation: "make the target match the source's current state of this key"."""
    return s3_record(op, bucket, key, size=size, etag=etag, region=region, event_time=event_time,
                     origin="reconcile", event_name="ObjectCreated:Put" if op == "put" else "ObjectRemoved:Delete")


def encode_notification(records: list[dict[str, Any]]) -> bytes:
    return json.dumps({"Records": records}).encode()


def message_key(bucket: str, key: str) -> bytes:
    """Kafka key: one object's events land in one partition, so they stay in order."""
    return f"{bucket}/{key}".encode()
