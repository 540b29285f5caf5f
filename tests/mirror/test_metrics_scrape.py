"""A real mirror run with metrics on a fresh registry, scraped over HTTP like Prometheus would."""
from __future__ import annotations

from urllib.request import Request, urlopen

from prometheus_client.parser import text_string_to_metric_families

from mirror.runner import Mirror
from tests.support import delete_event, produce, put_event, site, topo
from xdc.config import XdcConfig
from xdc.events import new_sequencer
from xdc.metrics import Metrics, new_registry
from xdc.observe.http import serve

SRC = "idca-drive"


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urlopen(Request(url, headers={"Accept": "text/plain"}), timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_scraped_lag_count_equals_applied_events(xcfg: XdcConfig, tag: str) -> None:
    topic = xcfg.dc("A").kafka.topics.events
    keys = [f"lidar/{tag}/{i}.bin" for i in range(25)]
    puts = [put_event(SRC, k, seq=new_sequencer(), size=100) for k in keys]
    metrics = Metrics(new_registry())
    with serve("127.0.0.1", 0, registry=metrics.registry) as srv:
        produce(xcfg, "A", topic, puts)
        with Mirror(topo(xcfg, "B"), metrics=metrics) as m:
            first = m.run(once=True)
        # then a delete (an applied event too), a duplicate (ignored) and a dead letter
        produce(xcfg, "A", topic, [delete_event(SRC, keys[0], seq=new_sequencer()), puts[1], (b"x", b"{not json")])
        with Mirror(topo(xcfg, "B"), metrics=metrics) as m:
            second = m.run(once=True)
        scraped = _scrape(srv.url + "/metrics")

    assert (first.applied, second.applied) == (25, 1)
    totals = site(xcfg, "B").state.catalog.route_totals()["lidar"]
    assert (totals["objects"], totals["tombstones"]) == (24, 1)  # 24 live objects and one tombstone
    count = sum(v for _, v in scraped["xdc_replication_lag_seconds_count"])
    assert count == first.applied + second.applied == 26
    inf_bucket = sum(v for lab, v in scraped["xdc_replication_lag_seconds_bucket"] if lab["le"] == "+Inf")
    assert inf_bucket == count
    by_op = {lab["op"]: v for lab, v in scraped["xdc_events_applied_total"] if lab["route"] == "lidar"}
    assert by_op == {"put": 25, "delete": 1, "tags": 0, "acl": 0}  # every op has its series from the start
    assert sum(v for _, v in scraped["xdc_dead_letters_total"]) == 1
