"""The outbox publisher on a real broker, on SQLite and PostgreSQL state: every row is published once,
in queue order per key, also when the publisher is killed (SIGKILL) between sending and deleting,
and when two publishers flush at the same time."""
from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from kafka.partitioner.default import murmur2

from tests.mirror.chaos_support import child_env, write_config
from tests.support import read_topic, site
from xdc.config import XdcConfig
from xdc.io.outbox import HEADER, OutboxPublisher
from xdc.io.state import CatalogEntry, Outgoing
from xdc.io.state.base import ObjectCatalog

pytestmark = pytest.mark.both_backends

ROOT = Path(__file__).resolve().parents[3]

# A publisher in its own process that kills itself (SIGKILL) after sending, before deleting the rows.
_CRASHING_PUBLISHER = """
import sys
from xdc.config import load_config
from xdc.io.outbox import OutboxPublisher
from xdc.topology import Topology
with Topology(load_config(sys.argv[1]), "B") as topo:
    here = topo.here
    OutboxPublisher(here.state.catalog, lambda: here.producer, lambda: here.consumer(None), name="test").flush()
print("not killed")
"""


def _queue(cat: ObjectCatalog, topic: str, keys: list[str], n: int, tag: str) -> list[bytes]:
    """`n` rows per key, queued one commit per row, keys interleaved; returns the values in queue order."""
    values = []
    for i in range(n):
        entries = [CatalogEntry("b", f"{tag}/{k}/{i}", 1, "e", f"{i:04d}", False, 1.0, 2.0, "r", "metadata", "A",
                                "s", f"{k}/{i}", "e") for k in keys]
        for e in entries:
            cat.commit_batch([e], lambda ok: [Outgoing(topic, o.source_key.split("/")[0].encode(), o.key.encode())
                                              for o in ok], {})
            values.append(e.key.encode())
    return values


def _publisher(cfg: XdcConfig) -> OutboxPublisher:
    here = site(cfg, "B")
    return OutboxPublisher(here.state.catalog, lambda: here.producer, lambda: here.consumer(None), name="test")


def _check_once_in_order(cfg: XdcConfig, topic: str, queued: list[bytes]) -> None:
    got = read_topic(cfg, "B", topic, timeout_s=20)
    values = [r.value for r in got]
    assert Counter(values) == Counter(queued), "every row exactly once"
    parts = cfg.dc("B").kafka.partitions
    for r in got:  # the partition the publisher chose is the default partitioner's
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % parts
        assert dict(r.headers)[HEADER]
    for key in {r.key for r in got}:
        mine = [r.value for r in got if r.key == key]
        assert mine == [v for v in queued if v in set(mine)], f"key {key!r} out of queue order"


def test_every_row_once_in_order_after_a_kill_between_send_and_delete(xcfg: XdcConfig, tmp_path: Path,
                                                                     tag: str) -> None:
    topic = xcfg.dc("B").kafka.topics.applied
    cat = site(xcfg, "B").state.catalog
    first = _queue(cat, topic, ["p0", "p1", "p2"], 5, tag)
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml")
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_PUBLISHER, str(cfg_file)], cwd=ROOT,
                             env={**child_env(), "XDC_CRASH_AT": "test.in_outbox_flush"}, capture_output=True)
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    assert cat.outbox_size() == len(first)  # sent, not deleted: the rows and their marks are still there
    more = _queue(cat, topic, ["p0", "p3"], 3, f"{tag}-more")
    pub = _publisher(xcfg)
    try:
        n = pub.flush()
        assert n == len(more)  # the dead publisher's rows are found in Kafka, not sent again
        assert pub.found_sent == len(first)
    finally:
        pub.close()
    assert cat.outbox_size() == 0
    _check_once_in_order(xcfg, topic, first + more)


def test_marked_rows_that_never_left_are_sent(xcfg: XdcConfig, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = xcfg.dc("B").kafka.topics.applied
    cat = site(xcfg, "B").state.catalog
    queued = _queue(cat, topic, ["p0", "p1"], 4, tag)
    pub = _publisher(xcfg)
    try:
        def broker_away(*a: object, **kw: object) -> None:
            raise RuntimeError("died after marking, before sending")

        monkeypatch.setattr(pub.producer, "send", broker_away)
        with pytest.raises(RuntimeError):
            pub.flush()
        monkeypatch.undo()
        assert pub.flush() == len(queued) and pub.found_sent == 0
    finally:
        pub.close()
    _check_once_in_order(xcfg, topic, queued)


def test_two_publishers_at_once_keep_each_key_in_order(xcfg: XdcConfig, tag: str) -> None:
    topic = xcfg.dc("B").kafka.topics.applied
    cat = site(xcfg, "B").state.catalog
    keys = [f"p{i}" for i in range(6)]
    queued: list[bytes] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    pubs = [_publisher(xcfg), _publisher(xcfg)]

    def flusher(p: OutboxPublisher) -> None:
        try:
            while not stop.is_set():
                p.flush()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=flusher, args=(p,)) for p in pubs]
    for t in threads:
        t.start()
    try:
        for round_ in range(6):
            queued += _queue(cat, topic, keys, 3, f"{tag}/{round_}")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    pubs[0].flush()
    for p in pubs:
        p.close()
    assert not errors, errors
    assert cat.outbox_size() == 0
    _check_once_in_order(xcfg, topic, queued)
