"""Config history, diff, endpoint checks and timeline assembly: pure logic over SQLite state files
(no Kafka, S3 or cache is reached)."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from xdc.config import parse_config
from xdc.errors import ConfigError
from xdc.observe import configs, telemetry
from xdc.observe.impact import _changed_fields, endpoint_mistakes
from xdc.observe.timeline import names_of, timeline
from xdc.topology import Topology


def data(tmp_path: Path) -> dict[str, Any]:
    return {
        "local_dc": "A",
        "datacenters": {dc: {"s3": {"internal_url": f"http://s3-{dc.lower()}.internal:9000",
                                    "external_url": f"https://s3-{dc.lower()}.example.com",
                                    "credentials": {"access_key_env": f"T_{dc}_AK", "secret_key_env": f"T_{dc}_SK"}},
                             "kafka": {"bootstrap_servers": [f"kafka-{dc.lower()}:9092"]},
                             "state_url": f"sqlite:///{tmp_path}/{dc}.db"} for dc in ("A", "B")},
        "routes": [{"name": "camera", "mode": "data", "source": {"dc": "A", "bucket": "idca-drive", "prefix": "camera/"},
                    "target": {"dc": "B", "bucket": "idcb-drive", "prefix": "cam/"}}],
    }


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "s3cr3t-value-that-must-not-leak"
    for dc in ("A", "B"):
        monkeypatch.setenv(f"T_{dc}_AK", "AKIDEXAMPLE")
        monkeypatch.setenv(f"T_{dc}_SK", value)
    return value


def test_hash_ignores_where_the_process_runs_and_changes_with_the_config(tmp_path: Path) -> None:
    d = data(tmp_path)
    a = parse_config(copy.deepcopy(d), base_dir=tmp_path, dc="A")
    b = parse_config(copy.deepcopy(d), base_dir=tmp_path / "elsewhere", dc="B")
    assert configs.config_hash(a) == configs.config_hash(b)
    d["routes"][0]["mode"] = "metadata"
    assert configs.config_hash(parse_config(d, base_dir=tmp_path)) != configs.config_hash(a)


def test_a_long_running_process_records_its_config_masked_and_is_diffed(tmp_path: Path, secrets: str) -> None:
    cfg = parse_config(data(tmp_path), base_dir=tmp_path, dc="B")
    with Topology(cfg) as topo:
        t = telemetry.start(topo, "mirror", long_running=True)
        live = configs.processes(topo)
        t.close()
        hist = configs.history(topo)
        after = configs.processes(topo)
        (label, body) = configs.resolve_version(topo, configs.short(configs.config_hash(cfg))[:8])
    (p,) = live["processes"]
    assert (p["component"], p["dc"], p["pid"], p["current"]) == ("mirror", "B", os.getpid(), True)
    assert live["mixed"] is False and after["processes"] == []
    (v,) = hist
    assert v["hash"] == configs.config_hash(cfg) and v["processes"] == 1 and v["datacenters"] == ["B"]
    dumped = json.dumps(body)
    assert secrets not in dumped and "AKIDEXAMPLE" not in dumped and "****" in dumped
    assert body["local_dc"] is None and "url_used_here" not in dumped
    # diff: the recorded version against a proposed file
    new = data(tmp_path)
    new["routes"][0]["target"]["prefix"] = "camera/"
    f = tmp_path / "new.yaml"
    f.write_text(yaml.safe_dump(new))
    with Topology(cfg) as topo:
        out = configs.diff(topo, configs.config_hash(cfg)[:10], str(f))
        with pytest.raises(ConfigError, match="neither a file nor a config hash"):
            configs.diff(topo, "ffffffff", str(f))
    assert "-    prefix: cam/\n" in out and "+    prefix: camera/\n" in out
    assert secrets not in out


def test_endpoint_mistakes_and_changed_fields(tmp_path: Path) -> None:
    d = data(tmp_path)
    assert endpoint_mistakes(parse_config(copy.deepcopy(d), base_dir=tmp_path)) == []
    d["datacenters"]["A"]["s3"]["external_url"] = "http://127.0.0.1:9000"
    d["datacenters"]["B"]["s3"]["internal_url"] = "http://s3-a.internal:9000"
    d["datacenters"]["B"]["kafka"]["external_bootstrap_servers"] = ["kafka-a:9092"]
    got = endpoint_mistakes(parse_config(d, base_dir=tmp_path))
    assert any("A: s3.external_url http://127.0.0.1:9000 is a loopback" in m for m in got)
    assert any("B: s3.internal_url http://s3-a.internal:9000 is datacenter A's internal endpoint" in m for m in got)
    assert any("B: kafka.external_bootstrap_servers ['kafka-a:9092'] are datacenter A's internal" in m for m in got)
    assert _changed_fields({"routes": [{"name": "x", "m": 1}, {"name": "y", "m": 2}]},
                           {"routes": [{"name": "y", "m": 3}, {"name": "x", "m": 1}]}) == ["routes.y.m"]


def test_names_of_an_object_in_every_datacenter(tmp_path: Path) -> None:
    cfg = parse_config(data(tmp_path), base_dir=tmp_path)
    both = [("A", "idca-drive/camera/x/1.jpg"), ("B", "idcb-drive/cam/x/1.jpg")]
    assert names_of(cfg, "idca-drive/camera/x/1.jpg") == both
    assert names_of(cfg, "idcb-drive/cam/x/1.jpg") == both
    assert names_of(cfg, "idca-drive/other/1.jpg") == [("A", "idca-drive/other/1.jpg")]
    with pytest.raises(ConfigError):
        names_of(cfg, "no-key")


def _span(sid: str, parent: str | None, name: str, key: str | None, dc: str, t0: float, t1: float,
          **attrs: Any) -> dict[str, Any]:
    return {"trace_id": "t" * 32, "span_id": sid, "parent_id": parent, "name": name, "dc": dc, "component": "c",
            "key": key, "start_time": t0, "end_time": t1, "status": "ok", "error": "", "attributes": attrs, "links": []}


def test_timeline_keeps_the_objects_path_and_names_the_slowest_step(tmp_path: Path) -> None:
    cfg = parse_config(data(tmp_path), base_dir=tmp_path)
    a_key, b_key = "idca-drive/camera/f.jpg", "idcb-drive/cam/f.jpg"
    spans = [
        _span("i", None, "ingest.object", a_key, "A", 100.0, 100.3, **{"xdc.event_time": 100.25}),
        _span("p", "i", "s3.put", None, "A", 100.0, 100.2),
        _span("k", "i", "kafka.publish", a_key, "A", 100.25, 100.4),
        _span("m", "k", "mirror.apply", b_key, "B", 102.4, 103.0),  # 2 s in Kafka
        _span("c", "m", "mirror.copy", b_key, "B", 102.5, 102.9),
        _span("s", "m", "state.commit", b_key, "B", 102.9, 102.95),
        _span("x", "k", "mirror.apply", "idcb-drive/cam/other.jpg", "B", 102.4, 102.5),  # another object
        _span("w", "m", "cache.warm_file", b_key, "B", 110.0, 110.5, **{"xdc.node": "b0"}),  # prewarm 7 s later
    ]
    with Topology(cfg) as t:
        t.site("A").state.traces.record([s for s in spans if s["dc"] == "A"], retention_s=1e12, max_spans=100)
        t.site("B").state.traces.record([s for s in spans if s["dc"] == "B"], retention_s=1e12, max_spans=100)
        tl = timeline(t, b_key)
        same = timeline(t, a_key)
        assert timeline(t, "idcb-drive/cam/none.jpg") is None
    assert tl is not None and same is not None
    assert [s.span_id for s in tl.steps] == [s.span_id for s in same.steps] == ["i", "p", "k", "m", "c", "s", "w"]
    assert [s.depth for s in tl.steps] == [0, 1, 1, 2, 3, 3, 3]
    assert tl.start == 100.0 and tl.end == 110.5
    assert tl.milestones == {"event_time": 100.25, "published": 100.4, "consumed": 102.4, "applied": 102.95,
                             "warmed": {"B:b0": 110.5}}
    m = next(s for s in tl.steps if s.span_id == "m")
    assert abs(m.self_s - 0.15) < 1e-9  # 0.6 s minus copy (0.4) and commit (0.05)
    assert tl.slowest["label"] == "until the prewarm began" and abs(tl.slowest["seconds"] - 7.0) < 1e-6
    waits = {w["name"]: w["seconds"] for w in tl.to_dict()["waits"]}
    assert abs(waits["kafka.publish -> mirror.apply"] - 2.0) < 1e-6
