"""Resize workers as replicas on PostgreSQL state: workers of one consumer group share the events
topic's partitions, and each derivative is written once (PUTs counted at the S3 endpoint, through a
pass-through proxy), also when a third worker joins while the others are resizing (a rebalance
mid-batch: a batch redone by the new owner finds its derivatives and writes nothing)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kafka.partitioner.default import murmur2

from devtools.faultproxy import FaultProxy
from devtools.samples import make_frame
from mirror.ingest import ingest
from resize.worker import ResizeWorker
from tests.conftest import isolated
from tests.mirror.chaos_support import committed_offsets, variant
from tests.support import end_offsets
from xdc.config import XdcConfig
from xdc.events import message_key
from xdc.metrics import Metrics, new_registry
from xdc.topology import Topology

SRC = "idca-drive"


def _names_on_every_partition(prefix: str, partitions: int, per_partition: int) -> list[str]:
    """Frame names whose events land `per_partition` times on each partition (keys are hashed)."""
    names: list[str] = []
    count = [0] * partitions
    i = 0
    while min(count) < per_partition:
        name = f"f{i:04d}.jpg"
        p = (murmur2(message_key(SRC, prefix + name)) & 0x7FFFFFFF) % partitions
        if count[p] < per_partition:
            count[p] += 1
            names.append(name)
        i += 1
    return names


@pytest.mark.slow
def test_workers_share_partitions_and_write_each_derivative_once(stack_cfg: XdcConfig, pg_port: int, tag: str,
                                                                 tmp_path: Path) -> None:
    base = isolated(stack_cfg, tag, pg_port=pg_port)
    with FaultProxy(base.dc("A").s3.internal_url) as proxy:
        cfg = variant(base, {"datacenters": {"A": {"s3": {"internal_url": proxy.url, "external_url": proxy.url}}},
                             "resize": {"workers": 1}})
        partitions = cfg.dc("A").kafka.partitions
        raw, derived = f"camera/raw/{tag}/", f"camera/720p/{tag}/"
        names = _names_on_every_partition(raw, partitions, 3)
        stop = threading.Event()
        workers: list[ResizeWorker] = []
        threads: list[threading.Thread] = []
        errors: list[BaseException] = []

        def start_worker() -> ResizeWorker:
            w = ResizeWorker(Topology(cfg, "A"), metrics=Metrics(new_registry()))

            def run() -> None:
                try:
                    w.run(stop=stop)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            workers.append(w)
            threads.append(threading.Thread(target=run, name=f"resize-{len(workers)}"))
            threads[-1].start()
            return w

        def shared_by(n: int) -> bool:
            owned = [set(w.assigned) for w in workers[:n]]
            return all(owned) and sum(map(len, owned)) == partitions and len(set().union(*owned)) == partitions

        try:
            start_worker(), start_worker()
            _until("both workers hold partitions", lambda: shared_by(2), 90, errors)
            time.sleep(2)  # settled
            assert shared_by(2)
            frames = tmp_path / "frames"
            frames.mkdir()
            for i, name in enumerate(names):
                (frames / name).write_bytes(make_frame(i, 1920, 1080))
            site_a = Topology(cfg, "A")
            try:
                ingest(site_a.here, frames, SRC, raw)
                store = site_a.here.store
                # a third worker joins while the two are resizing: a rebalance in the middle of batches
                _until("the first derivatives", lambda: any(True for _ in store.list(SRC, derived)), 120, errors)
                start_worker()
                _until("every derivative", lambda: len(list(store.list(SRC, derived))) == len(names), 180, errors)
                group, events = site_a.here.group("resize"), site_a.here.topics.events
                _until("every event handled and committed",
                       lambda: committed_offsets(cfg, "A", group) == end_offsets(cfg, "A", events), 120, errors)
            finally:
                site_a.close()
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            for w in workers:
                w.close()
                w.site.topology.close()
        assert not errors, errors

    puts = {path: n for (method, path), n in proxy.requests.items() if method == "PUT" and derived in path}
    assert sorted(puts) == sorted(f"/{SRC}/{derived}{name}" for name in names), puts
    assert set(puts.values()) == {1}, {p: n for p, n in puts.items() if n != 1}
    resized = [w.stats.results.get("resized", 0) for w in workers]
    print(f"\nresized per worker: {resized}; redone and found done: "
          f"{[w.stats.results.get('done_before', 0) for w in workers]}")
    assert sum(resized) == len(names) and resized[0] > 0 and resized[1] > 0


def _until(what: str, cond: object, timeout_s: float, errors: list[BaseException]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert not errors, errors
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.1)
