"""The mirror end to end on the real local stack: Apache Kafka brokers, JuiceFS S3 gateways, SQLite."""
from __future__ import annotations

from pathlib import Path

import pytest

from mirror.ingest import ingest, publish_delete, scan
from mirror.runner import Mirror
from tests.support import delete_event, produce, put_event, read_topic, site, topo
from xdc.config import XdcConfig
from xdc.events import new_sequencer, parse_applied
from xdc.metrics import Metrics, new_registry

pytestmark = pytest.mark.both_backends

SRC, DST = "idca-drive", "idcb-drive"


def _files(root: Path, tag: str, n: int, sub: str = "camera", size: int = 50_000) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        unit = f"{tag}-{i}-".encode()
        data = (unit * (size // len(unit) + 1))[:size]
        p = root / tag / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[f"{sub}/{tag}/f{i}.bin"] = data
    return out


def _mirror(cfg: XdcConfig, **kw):  # type: ignore[no-untyped-def]
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry()), **kw) as m:
        return m.run(once=True)


def test_data_mode_end_to_end_copies_bytes_and_publishes_applied(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    files = _files(tmp_path, tag, 5)
    ingest(site(xcfg, "A"), tmp_path, SRC, "camera/")
    stats = _mirror(xcfg)
    assert stats.applied == 5
    dst = site(xcfg, "B", seen_from="B").store
    for key, data in files.items():
        assert dst.get(DST, key) == data
        assert dst.head(DST, key).metadata["xdc-source-etag"]
    cat = site(xcfg, "B").state.catalog
    e = cat.get(DST, next(iter(files)))
    assert e is not None and e.mode == "data" and e.applied_time >= e.event_time
    applied = [a for r in read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.applied) for a in parse_applied(r.value)]
    assert sorted(a.key for a in applied) == sorted(files)
    assert all(a.op == "put" and a.source["dc"] == "A" for a in applied)


def test_metadata_mode_records_metadata_only(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    files = _files(tmp_path, tag, 3)
    ingest(site(xcfg, "A"), tmp_path, SRC, "lidar/")
    assert _mirror(xcfg).applied == 3
    dst = site(xcfg, "B", seen_from="B").store
    cat = site(xcfg, "B").state.catalog
    for key in files:
        lkey = key.replace("camera/", "lidar/")
        e = cat.get(DST, lkey)
        assert e is not None and e.mode == "metadata" and e.size == 50_000
        assert not dst.exists(DST, lkey)


def test_delete_leaves_tombstone_and_removes_object(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    files = _files(tmp_path, tag, 2)
    ingest(site(xcfg, "A"), tmp_path, SRC, "camera/")
    assert _mirror(xcfg).applied == 2
    gone = next(iter(files))
    publish_delete(site(xcfg, "A"), SRC, gone)
    assert _mirror(xcfg).applied == 1
    dst = site(xcfg, "B", seen_from="B").store
    assert not dst.exists(DST, gone)
    e = site(xcfg, "B").state.catalog.get(DST, gone)
    assert e is not None and e.deleted


def test_older_event_out_of_order_is_ignored(xcfg: XdcConfig, tag: str) -> None:
    key = f"lidar/{tag}/scan.bin"
    topic = xcfg.dc("A").kafka.topics.events
    produce(xcfg, "A", topic, [put_event(SRC, key, seq="0000000200", size=200),
                               delete_event(SRC, key, seq="0000000100")])  # older delete arrives late
    stats = _mirror(xcfg)
    assert stats.applied == 1
    e = site(xcfg, "B").state.catalog.get(DST, key)
    assert e is not None and not e.deleted and e.size == 200
    # and across batches: a later run sees an older put
    produce(xcfg, "A", topic, [put_event(SRC, key, seq="0000000150", size=150)])
    stats = _mirror(xcfg)
    assert stats.applied == 0 and stats.ignored["stale"] == 1


def test_same_batch_twice_is_applied_once(xcfg: XdcConfig, tag: str) -> None:
    topic = xcfg.dc("A").kafka.topics.events
    batch = [put_event(SRC, f"lidar/{tag}/{i}.bin", seq=new_sequencer(), size=i) for i in range(10)]
    produce(xcfg, "A", topic, batch + batch)
    stats = _mirror(xcfg)
    assert stats.applied == 10
    assert stats.ignored["superseded_in_batch"] + stats.ignored["duplicate"] == 10
    produce(xcfg, "A", topic, batch)  # and once more, in a later batch
    stats = _mirror(xcfg)
    assert stats.applied == 0 and stats.ignored["duplicate"] == 10
    applied = [a for r in read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.applied) for a in parse_applied(r.value)]
    assert len(applied) == 10


def test_restarted_mirror_resumes_from_committed_offset(xcfg: XdcConfig, tag: str) -> None:
    topic = xcfg.dc("A").kafka.topics.events
    first = [put_event(SRC, f"lidar/{tag}/a{i}.bin", seq=new_sequencer()) for i in range(20)]
    second = [put_event(SRC, f"lidar/{tag}/b{i}.bin", seq=new_sequencer()) for i in range(15)]
    produce(xcfg, "A", topic, first)
    assert _mirror(xcfg).applied == 20
    produce(xcfg, "A", topic, second)
    stats = _mirror(xcfg)  # a new process, same group
    assert stats.records == 15 and stats.applied == 15
    cat = site(xcfg, "B").state.catalog
    assert len([e for e in cat.live_objects(DST) if f"/{tag}/" in e.key]) == 35
    committed = cat.offsets(f"{xcfg.mirror.group_id}.B")
    assert sum(committed.values()) == 35  # the catalog's offsets agree with what was consumed


def test_malformed_message_goes_to_dead_letter_topic_and_rest_applies(xcfg: XdcConfig, tag: str) -> None:
    topic = xcfg.dc("A").kafka.topics.events
    good = [put_event(SRC, f"lidar/{tag}/{i}.bin", seq=new_sequencer()) for i in range(3)]
    bad = [(b"k1", b"{not json"), (b"k2", b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}'),
           put_event(SRC, f"lidar/{tag}/../../etc/passwd", seq=new_sequencer())]
    produce(xcfg, "A", topic, good[:1] + bad + good[1:])
    stats = _mirror(xcfg)
    assert stats.applied == 3 and stats.dead_letters == 3
    letters = read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.dead_letter)
    reasons = sorted(dict(r.headers)["xdc-reason"].decode() for r in letters)
    assert reasons == ["bad_json", "bad_key", "bad_shape"]
    assert {r.value for r in letters} == {v for _, v in bad}  # original bytes kept


def test_scan_publishes_missed_changes(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    src = site(xcfg, "A").store
    for i in range(4):  # objects that arrived with no notification
        src.put(SRC, f"lidar/{tag}/s{i}.bin", b"x" * (i + 1))
    rep = scan(site(xcfg, "A"), SRC, f"lidar/{tag}/")
    assert (rep.listed, rep.missing, rep.events) == (4, 4, 4)
    assert _mirror(xcfg).applied == 4
    src.delete(SRC, f"lidar/{tag}/s0.bin")
    rep = scan(site(xcfg, "A"), SRC, f"lidar/{tag}/")
    assert (rep.missing, rep.extra) == (0, 1)
    assert _mirror(xcfg).applied == 1
    assert scan(site(xcfg, "A"), SRC, f"lidar/{tag}/").events == 0


def test_mirror_over_sasl_ssl_brokers(secure_cfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    """The same flow where both brokers take only SASL_SSL (A: SCRAM-SHA-512; B: PLAIN + client
    certificates): ingest publishes to A, the mirror reads A and writes B's applied topic and catalog."""
    assert {site(secure_cfg, dc).brokers.security.protocol for dc in ("A", "B")} == {"SASL_SSL"}
    files = _files(tmp_path, tag, 4)
    ingest(site(secure_cfg, "A"), tmp_path, SRC, "camera/")
    publish_delete(site(secure_cfg, "A"), SRC, sorted(files)[0])
    stats = _mirror(secure_cfg)
    assert stats.records == 5 and stats.applied == 4 and stats.dead_letters == 0  # put+delete of one key: newest wins
    dst = site(secure_cfg, "B").store
    for key, data in sorted(files.items())[1:]:
        assert dst.get(DST, key) == data
    assert not dst.exists(DST, sorted(files)[0])
    applied = [a for r in read_topic(secure_cfg, "B", secure_cfg.dc("B").kafka.topics.applied)
               for a in parse_applied(r.value)]
    assert sorted(a.key for a in applied if a.op == "put") == sorted(files)[1:]
    cat = site(secure_cfg, "B").state.catalog
    assert sum(cat.offsets(f"{secure_cfg.mirror.group_id}.B").values()) == 5
