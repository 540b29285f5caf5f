"""What the mirror's copies keep: multipart ETags, content type, cache control, user metadata; and
what it records when an ETag cannot be kept (the catalog's two ETags, etag_changes, a metric)."""
from __future__ import annotations

from mirror.runner import Mirror
from tests.support import MIB, blob, produce, put_event, put_multipart, site, topo
from xdc.config import XdcConfig
from xdc.events import new_sequencer
from xdc.metrics import Metrics, new_registry

SRC, DST = "idca-drive", "idcb-drive"


def test_mirror_keeps_etags_and_metadata_and_records_why_when_it_cannot(xcfg: XdcConfig, tag: str) -> None:
    a = site(xcfg, "A").store
    regular = [blob(5 * MIB, 1), blob(5 * MIB, 2), blob(3 * MIB, 3)]  # one part size: ETag kept
    odd = [blob(6 * MIB, 4), blob(5 * MIB, 5), blob(1 * MIB, 6)]  # no single part size: cannot be
    objs = {
        f"camera/{tag}/regular.bin": (put_multipart(a, SRC, f"camera/{tag}/regular.bin", regular,
                                                    ContentType="image/x-raw", CacheControl="no-cache",
                                                    Metadata={"vehicle": "av-17"}), regular),
        f"camera/{tag}/odd.bin": (put_multipart(a, SRC, f"camera/{tag}/odd.bin", odd), odd),
    }
    produce(xcfg, "A", xcfg.dc("A").kafka.topics.events,
            [put_event(SRC, k, seq=new_sequencer(), size=sum(map(len, p)), etag=e) for k, (e, p) in objs.items()])
    metrics = Metrics(new_registry())
    with Mirror(topo(xcfg, "B"), metrics=metrics) as m:
        stats = m.run(once=True)
    assert stats.applied == 2 and stats.dead_letters == 0 and stats.etag_changed == 1
    b = site(xcfg, "B").store
    cat = site(xcfg, "B").state.catalog
    key = f"camera/{tag}/regular.bin"
    head, src_head = b.client.head_object(Bucket=DST, Key=key), a.client.head_object(Bucket=SRC, Key=key)
    assert head["ETag"] == src_head["ETag"] and head["ContentLength"] == src_head["ContentLength"]
    assert (head["ContentType"], head["CacheControl"]) == ("image/x-raw", "no-cache")
    assert head["Metadata"]["vehicle"] == "av-17" and head["Metadata"]["xdc-source-etag"] == objs[key][0]
    assert b.get(DST, key) == b"".join(regular)
    e = cat.get(DST, key)
    assert e is not None and e.etag == e.source_etag == objs[key][0]

    key = f"camera/{tag}/odd.bin"
    assert b.get(DST, key) == b"".join(odd)
    e = cat.get(DST, key)
    assert e is not None and e.source_etag == objs[key][0] and e.etag == b.head(DST, key).etag != e.source_etag
    (row,) = [r for r in site(xcfg, "B").state.incidents.recent("etag_changes") if r["key"] == key]
    assert row["layout"] == "rechunked" and "none of" in row["reason"] and row["etag"] == e.etag
    assert metrics.registry.get_sample_value("xdc_copies_etag_changed_total", {"route": "camera"}) == 1.0
