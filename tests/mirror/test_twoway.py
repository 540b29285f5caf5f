"""Two-way routes on the local stack with store-made events: both mirrors running (one per target
datacenter); copies are counted from the events topics (what each store announced), not from the
mirror's counters."""
from __future__ import annotations

import json
import time

import pytest

from mirror.runner import Mirror
from tests.support import read_topic, site, topo
from xdc.config import XdcConfig, parse_config
from xdc.metrics import Metrics, new_registry

pytestmark = pytest.mark.both_backends(postgres="stress")

BUCKET = {"A": "idca-drive", "B": "idcb-drive"}


def _two_way(cfg: XdcConfig) -> XdcConfig:
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    pol = {"conflict": "last_writer_wins"}
    data["routes"] = [
        {"name": "camera-ab", "source": {"dc": "A", "bucket": BUCKET["A"], "prefix": "camera/"},
         "target": {"dc": "B", "bucket": BUCKET["B"], "prefix": "camera/"}, "mode": "data", "two_way": pol},
        {"name": "camera-ba", "source": {"dc": "B", "bucket": BUCKET["B"], "prefix": "camera/"},
         "target": {"dc": "A", "bucket": BUCKET["A"], "prefix": "camera/"}, "mode": "data", "two_way": pol}]
    return parse_config(data, base_dir=cfg.base_dir)


def _created(cfg: XdcConfig, dc: str, tag: str) -> dict[str, int]:
    """ObjectCreated announcements per key on a datacenter's events topic (the store's own count)."""
    out: dict[str, int] = {}
    for rec in read_topic(cfg, dc, cfg.dc(dc).kafka.topics.events):
        for r in json.loads(rec.value)["Records"]:
            key = r["s3"]["object"]["key"]
            if r["eventName"].startswith("ObjectCreated:") and tag in key:
                out[key] = out.get(key, 0) + 1
    return out


def _settle(cfg: XdcConfig, metrics: dict[str, Metrics], rounds: int = 3) -> None:
    """Both mirrors, in turn, until echoes of echoes would have shown up."""
    for _ in range(rounds):
        for here in ("B", "A"):
            with Mirror(topo(cfg, here), metrics=metrics[here]) as m:
                m.run(once=True)


def test_two_way_writes_reach_both_once_and_a_concurrent_write_is_settled(xcfg: XdcConfig, tag: str) -> None:
    cfg = _two_way(xcfg)
    stores = {dc: site(cfg, dc).store for dc in "AB"}
    metrics = {dc: Metrics(new_registry()) for dc in "AB"}
    written = {dc: {f"camera/{tag}/{dc.lower()}{i}.bin": f"{dc}{i}".encode() * 500 for i in range(3)} for dc in "AB"}
    for dc, objs in written.items():
        for k, body in objs.items():
            stores[dc].put(BUCKET[dc], k, body)  # announced by that datacenter's store
    _settle(cfg, metrics)

    every = {**written["A"], **written["B"]}
    for dc in "AB":
        for k, body in every.items():
            assert stores[dc].get(BUCKET[dc], k) == body, (dc, k)
        # one announcement per key per datacenter: the write where it was made, the copy in the other;
        # an echo sent back would be a second one
        assert _created(cfg, dc, tag) == {k: 1 for k in every}, dc
    for dc in "AB":
        echoes = metrics[dc].events_ignored_total.labels(route=f"camera-{'ba' if dc == 'A' else 'ab'}", reason="echo")
        assert echoes._value.get() == 3  # the other side's copies of this side's three writes

    # a concurrent write of one key on both sides: B's is the later one (next second), so B wins
    key = f"camera/{tag}/both.bin"
    stores["A"].put(BUCKET["A"], key, b"from A" * 100)
    time.sleep(1.1)
    stores["B"].put(BUCKET["B"], key, b"from B" * 100)
    a_etag = stores["A"].head(BUCKET["A"], key).etag
    _settle(cfg, metrics)
    kept = f"{key}.xdc-conflict-A-{a_etag[:12]}"
    for dc in "AB":
        assert stores[dc].get(BUCKET[dc], key) == b"from B" * 100, dc  # both converge to the winner
        assert stores[dc].get(BUCKET[dc], kept) == b"from A" * 100, dc  # the loser is kept, in both
    rows = site(cfg, "A").state.incidents.recent("conflicts")
    assert [(r["key"], r["winner_dc"], r["loser_dc"], r["loser_etag"], r["kept_key"], r["resolution"]) for r in rows] \
        == [(key, "B", "A", a_etag, kept, "last_writer_wins")]
    assert site(cfg, "B").state.incidents.recent("conflicts") == []  # reported once, where the loser was
    assert metrics["A"].conflicts_total.labels(route="camera-ba")._value.get() == 1
    assert metrics["B"].events_ignored_total.labels(route="camera-ab", reason="conflict_lost")._value.get() == 1
    created = {dc: _created(cfg, dc, tag) for dc in "AB"}
    assert created["A"][key] == 2 and created["B"][key] == 1  # A: its write, then B's version copied in
    assert created["A"][kept] == 1 and created["B"][kept] == 1
