"""S3 events as they arrive in practice, through the real mirror on the local stack: lifecycle
expirations, tag changes, ignored families, envelopes, and repairs mixed with S3-shaped sequencers.

The source store announces its own writes (the notifying proxy); a test that plays S3 itself (an
expiry, an envelope, a lost notification) writes through the gateway directly (`silent_store`)
and publishes the event it wants, with an S3-shaped sequencer such as 0055AED6DCD90281E5.
"""
from __future__ import annotations

import json

import pytest

from devtools.notifying_proxy import sequencer_now
from mirror.ingest import scan
from mirror.runner import Mirror, MirrorStats
from tests.support import eventbridge_event, produce, silent_store, site, sns_wrapped, sqs_wrapped, topo
from xdc.config import XdcConfig
from xdc.events import encode_notification, message_key, s3_record
from xdc.metrics import Metrics, new_registry

pytestmark = pytest.mark.both_backends(postgres="stress")

SRC, DST = "idca-drive", "idcb-drive"


def _mirror(cfg: XdcConfig, metrics: Metrics | None = None) -> MirrorStats:
    with Mirror(topo(cfg, "B"), metrics=metrics or Metrics(new_registry())) as m:
        return m.run(once=True)


def _s3_event(cfg: XdcConfig, op: str, key: str, *, seq: str, name: str | None = None, size: int = 0,
              etag: str = "") -> None:
    rec = s3_record(op, SRC, key, size=size, etag=etag, sequencer=seq, event_name=name)  # type: ignore[arg-type]
    produce(cfg, "A", cfg.dc("A").kafka.topics.events, [(message_key(SRC, key), encode_notification([rec]))])


def _seq() -> str:
    """A sequencer newer than any the store's proxy has issued so far (both grow with time)."""
    return sequencer_now(0)[1]


def test_lifecycle_expiration_removes_the_target_object(xcfg: XdcConfig, tag: str) -> None:
    src = site(xcfg, "A").store
    keys = [f"camera/{tag}/raw{i}.bin" for i in range(3)]
    for k in keys:
        src.put(SRC, k, k.encode() * 100)  # announced by the store
    assert _mirror(xcfg).applied == 3
    dst = site(xcfg, "B").store
    assert all(dst.exists(DST, k) for k in keys)
    # the bucket's lifecycle rule expires two of them: S3 deletes and announces it its own way
    for k, name in ((keys[0], "LifecycleExpiration:Delete"), (keys[1], "LifecycleExpiration:DeleteMarkerCreated")):
        silent_store(xcfg, "A").delete(SRC, k)
        _s3_event(xcfg, "delete", k, seq=_seq(), name=name)
    stats = _mirror(xcfg)
    assert stats.applied == 2 and stats.dead_letters == 0
    assert not dst.exists(DST, keys[0]) and not dst.exists(DST, keys[1]) and dst.exists(DST, keys[2])
    cat = site(xcfg, "B").state.catalog
    assert cat.get(DST, keys[0]).deleted and cat.get(DST, keys[1]).deleted  # type: ignore[union-attr]


def test_tag_changes_reach_the_target_object_and_the_state(xcfg: XdcConfig, tag: str) -> None:
    src = site(xcfg, "A").store
    data_key, meta_key = f"camera/{tag}/frame.jpg", f"lidar/{tag}/scan.bin"
    src.put(SRC, data_key, b"frame" * 100)
    src.put(SRC, meta_key, b"scan" * 100)
    assert _mirror(xcfg).applied == 2
    src.put_tags(SRC, data_key, {"retention": "30d", "label": "night rain"})  # ObjectTagging:Put
    src.put_tags(SRC, meta_key, {"sensor": "lidar-top"})
    stats = _mirror(xcfg)
    assert (stats.meta_applied, stats.dead_letters) == (2, 0)
    dst = site(xcfg, "B").store
    assert dst.get_tags(DST, data_key) == {"retention": "30d", "label": "night rain"}  # data route: on the object
    cat = site(xcfg, "B").state.catalog
    assert json.loads(cat.get(DST, data_key).tags) == {"retention": "30d", "label": "night rain"}  # type: ignore[union-attr,arg-type]
    assert json.loads(cat.get(DST, meta_key).tags) == {"sensor": "lidar-top"}  # type: ignore[union-attr,arg-type]
    assert not dst.exists(DST, meta_key)  # metadata route: recorded, nothing written
    # tags removed at the source (ObjectTagging:Delete), and a new version that carries its own
    src.put_tags(SRC, data_key, {})
    _mirror(xcfg)
    assert dst.get_tags(DST, data_key) == {}
    assert cat.get(DST, data_key).tags is None  # type: ignore[union-attr]
    src.put(SRC, data_key, b"frame2" * 100, tags={"retention": "7d"})
    _mirror(xcfg)
    assert dst.get(DST, data_key) == b"frame2" * 100 and dst.get_tags(DST, data_key) == {"retention": "7d"}


def test_acl_changes_become_canned_acls_on_the_target(xcfg: XdcConfig, tag: str) -> None:
    src = site(xcfg, "A").store
    key = f"camera/{tag}/public.jpg"
    src.put(SRC, key, b"p" * 10)
    _mirror(xcfg)
    src.put_acl(SRC, key, "public-read")  # ObjectAcl:Put
    assert _mirror(xcfg).meta_applied == 1
    assert site(xcfg, "B").store.get_acl(DST, key) == "public-read"
    assert site(xcfg, "B").state.catalog.get(DST, key).acl == "public-read"  # type: ignore[union-attr]


def test_restore_and_other_ignored_families_are_counted_not_dead_lettered(xcfg: XdcConfig, tag: str) -> None:
    key = f"camera/{tag}/archived.bin"
    site(xcfg, "A").store.put(SRC, key, b"a" * 10)
    for name in ("ObjectRestore:Post", "ObjectRestore:Completed", "LifecycleTransition",
                 "Replication:OperationFailedReplication", "IntelligentTiering"):
        _s3_event(xcfg, "put", key, seq=_seq(), name=name, size=10)
    metrics = Metrics(new_registry())
    stats = _mirror(xcfg, metrics)
    assert stats.dead_letters == 0 and stats.applied == 1  # the put; the rest is ignored by design
    assert stats.ignored["restore"] == 2
    got = {r: metrics.registry.get_sample_value("xdc_events_ignored_total", {"route": "camera", "reason": r})
           for r in ("restore", "transition", "replication", "tiering")}
    assert got == {"restore": 2.0, "transition": 1.0, "replication": 1.0, "tiering": 1.0}
    assert metrics.registry.get_sample_value("xdc_dead_letters_total",
                                             {"topic": xcfg.dc("A").kafka.topics.events, "reason": "unknown_event"}) is None


def test_eventbridge_sns_and_sqs_wrapped_puts_each_mirror_the_object(xcfg: XdcConfig, tag: str) -> None:
    silent = silent_store(xcfg, "A")  # S3 -> EventBridge / SNS / SQS -> Kafka: the test plays that chain
    msgs = []
    for how in ("eventbridge", "sns", "sqs", "sqs-sns"):
        key = f"camera/{tag}/{how} frame.jpg"
        info = silent.put(SRC, key, how.encode() * 1000)
        native = encode_notification([s3_record("put", SRC, key, size=info.size, etag=info.etag, sequencer=_seq())])
        if how == "eventbridge":
            value = json.dumps(eventbridge_event("Object Created", SRC, key, seq=_seq(), size=info.size,
                                                 etag=info.etag, reason="PutObject")).encode()
        elif how == "sns":
            value = sns_wrapped(native)
        elif how == "sqs":
            value = sqs_wrapped(native)
        else:
            value = sqs_wrapped(sns_wrapped(native))
        msgs.append((message_key(SRC, key), value))
    produce(xcfg, "A", xcfg.dc("A").kafka.topics.events, msgs)
    stats = _mirror(xcfg)
    assert stats.applied == 4 and stats.dead_letters == 0
    dst = site(xcfg, "B").store
    for how in ("eventbridge", "sns", "sqs", "sqs-sns"):
        assert dst.get(DST, f"camera/{tag}/{how} frame.jpg") == how.encode() * 1000


@pytest.mark.both_backends  # on PostgreSQL in CI too (the module's other tests: with --stress)
def test_scan_repairs_a_lost_notification_and_later_s3_events_still_apply(xcfg: XdcConfig, tag: str) -> None:
    """The issue's case: a key mirrored from an S3-shaped event, then changed with its notification
    lost. A repair must not lose against the S3 sequencer (it used to be dropped as stale), and must
    not beat the S3 events that come after it."""
    silent = silent_store(xcfg, "A")
    key = f"camera/{tag}/k.bin"
    v1 = silent.put(SRC, key, b"v1" * 500)
    _s3_event(xcfg, "put", key, seq="0055AED6DCD90281E5", size=v1.size, etag=v1.etag)
    assert _mirror(xcfg).applied == 1
    dst, cat = site(xcfg, "B").store, site(xcfg, "B").state.catalog
    assert dst.get(DST, key) == b"v1" * 500

    silent.put(SRC, key, b"v2" * 500)  # changed; its notification is lost
    rep = scan(site(xcfg, "A"), SRC, f"camera/{tag}/")
    assert (rep.differ, rep.events) == (1, 1)
    assert _mirror(xcfg).applied == 1
    assert dst.get(DST, key) == b"v2" * 500  # repaired
    e = cat.get(DST, key)
    assert e is not None and e.origin == "reconcile" and e.sequencer.startswith("0055AED6DCD90281E5")
    assert scan(site(xcfg, "A"), SRC, f"camera/{tag}/").events == 0

    # S3's order is kept: a redelivered or older S3 event does not undo the repair ...
    _s3_event(xcfg, "put", key, seq="0055AED6DCD90281E5", size=v1.size, etag=v1.etag)
    _s3_event(xcfg, "delete", key, seq="0055AED6DCD90281E0")
    st = _mirror(xcfg)
    assert st.applied == 0 and st.ignored["duplicate"] + st.ignored["stale"] >= 1
    assert dst.get(DST, key) == b"v2" * 500
    # ... and the next S3 event of the key applies
    v3 = silent.put(SRC, key, b"v3" * 500)
    _s3_event(xcfg, "put", key, seq="0055AED6DCD90281F0", size=v3.size, etag=v3.etag)
    assert _mirror(xcfg).applied == 1
    assert dst.get(DST, key) == b"v3" * 500
    e = cat.get(DST, key)
    assert e is not None and e.origin == "s3" and e.sequencer.startswith("0055AED6DCD90281F0")
    # a repair of a deleted source key deletes the target, still keeping the S3 order
    silent.delete(SRC, key)
    assert scan(site(xcfg, "A"), SRC, f"camera/{tag}/").extra == 1
    assert _mirror(xcfg).applied == 1 and not dst.exists(DST, key)
    _s3_event(xcfg, "put", key, seq="0055AED6DCD90281F0", size=v3.size, etag=v3.etag)  # late duplicate
    assert _mirror(xcfg).applied == 0 and not dst.exists(DST, key)
