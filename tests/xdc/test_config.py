"""Config validation (pure): typos, inconsistent routes, bucket-name collisions, secrets masking."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from xdc.config import load_config, parse_config
from xdc.errors import ConfigError
from xdc.topology import Topology, masked_view

SECRET_A, SECRET_B = "sEcReT-a-0123456789abcdef", "sEcReT-b-fedcba9876543210"
ACCESS_A, ACCESS_B = "AKIATESTACCESSA", "AKIATESTACCESSB"


def _dc(port: int, name: str, buckets: list[str]) -> dict[str, Any]:
    return {"s3": {"internal_url": f"http://127.0.0.1:{port}", "external_url": f"http://10.0.0.1:{port}",
                   "credentials": {"access_key_env": f"T_{name}_AK", "secret_key_env": f"T_{name}_SK"}},
            "kafka": {"bootstrap_servers": [f"127.0.0.1:{port + 1}"]},
            "state_url": f"sqlite:///{name}.db", "buckets": buckets}


BASE: dict[str, Any] = {
    "local_dc": "A",
    "datacenters": {"A": _dc(9000, "A", ["a-data"]), "B": _dc(9100, "B", ["b-data"])},
    "routes": [{"name": "cam", "source": {"dc": "A", "bucket": "a-drive", "prefix": "camera/"},
                "target": {"dc": "B", "bucket": "b-drive", "prefix": "camera/"}, "mode": "data"}],
}


def _cfg(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"T_A_AK": ACCESS_A, "T_A_SK": SECRET_A, "T_B_AK": ACCESS_B, "T_B_SK": SECRET_B}.items():
        monkeypatch.setenv(k, v)


def test_valid_config_and_derived_views(secrets_env: None) -> None:
    cfg = parse_config(_cfg(), base_dir=Path("/etc/xdc"))
    topo = Topology(cfg)  # seen from local_dc A: A's internal URL, B's external one
    assert topo.site("A").s3_url == "http://127.0.0.1:9000" and topo.site("B").s3_url == "http://10.0.0.1:9100"
    assert Topology(cfg, "B").site("B").s3_url == "http://127.0.0.1:9100"
    assert topo.site("B").state_location == "/etc/xdc/B.db"
    assert cfg.routes[0].target_key("camera/x/y.jpg") == "camera/x/y.jpg"
    assert cfg.dc("A").s3.credentials.resolve() == (ACCESS_A, SECRET_A)


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(mirorr={}), ["mirorr", "unknown key"]),
    (lambda d: d["datacenters"]["A"]["s3"].update(internal_url="ftp://x"), ["not an http"]),
    (lambda d: d["routes"][0]["target"].update(dc="C"), ["unknown datacenter", "'C'"]),
    (lambda d: d["routes"][0]["target"].update(dc="A"), ["same datacenter"]),
    (lambda d: d["routes"][0]["source"].update(prefix="../etc/"), ["no '..'"]),
    (lambda d: d["routes"][0]["source"].update(prefix="/abs/"), ["relative"]),
    (lambda d: d["routes"][0]["source"].update(bucket="Bad_Bucket"), ["not a valid S3 bucket name"]),
    (lambda d: d["datacenters"]["A"].update(state_url="mysql://x"), ["sqlite", "postgresql"]),
    (lambda d: d["routes"].append(copy.deepcopy(d["routes"][0])), ["unique"]),
    (lambda d: d.update(local_dc="Z"), ["local_dc"]),
    (lambda d: d["datacenters"]["A"]["s3"].update(credentials={"access_key_env": "X"}), ["credentials"]),
    (lambda d: d["mirror"].update(max_attempts=0) if "mirror" in d else d.update(mirror={"max_attempts": 0}),
     ["max_attempts"]),
    (lambda d: d.update(metrics={"host": "0.0.0.0", "port": 9464}), ["token_env", "reachable from other machines"]),
])
def test_invalid_configs_are_refused_with_the_place(mutate: Any, words: list[str]) -> None:
    d = _cfg()
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        parse_config(d)
    for w in words:
        assert w in str(ei.value)


def test_same_bucket_in_two_datacenters_is_refused() -> None:
    d = _cfg()
    d["datacenters"]["B"]["buckets"] = ["a-data"]  # same name, different data
    with pytest.raises(ConfigError) as ei:
        parse_config(d)
    msg = str(ei.value)
    assert "'a-data'" in msg and "A and B" in msg and "rename" in msg


def test_same_bucket_via_route_with_a_different_prefix_is_refused() -> None:
    d = _cfg()
    d["routes"][0]["target"] = {"dc": "B", "bucket": "a-drive", "prefix": "other/"}
    with pytest.raises(ConfigError, match="a-drive"):
        parse_config(d)


def test_same_bucket_mirrored_with_the_same_prefix_is_accepted() -> None:
    d = _cfg()
    d["routes"][0]["target"] = {"dc": "B", "bucket": "a-drive", "prefix": "camera/"}
    assert parse_config(d).routes[0].target.bucket == "a-drive"


def test_masked_view_never_shows_secret_values(secrets_env: None) -> None:
    text = yaml.safe_dump(masked_view(Topology(parse_config(_cfg()))))
    for v in (SECRET_A, SECRET_B, ACCESS_A, ACCESS_B):
        assert v not in text
    assert "T_A_SK" in text and "****" in text  # where it comes from, and that it resolves


def test_masked_view_reports_unresolved_credentials_without_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("T_A_SK", raising=False)
    view = masked_view(Topology(parse_config(_cfg())))
    assert "NOT RESOLVED" in view["datacenters"]["A"]["s3"]["credentials"]["resolved"]
    assert "T_A_SK" in view["datacenters"]["A"]["s3"]["credentials"]["resolved"]


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datacenters: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(_cfg(rouets=[])))
    with pytest.raises(ConfigError, match="typo.yaml.*rouets|rouets"):
        load_config(typo)


def test_xdc_dc_env_overrides_local_dc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDC_DC", "B")
    assert parse_config(_cfg()).local_dc == "B"


def test_metrics_token_is_read_from_its_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(_cfg(metrics={"host": "0.0.0.0", "port": 9464, "token_env": "XDC_TEST_METRICS_TOKEN"}))
    monkeypatch.delenv("XDC_TEST_METRICS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="XDC_TEST_METRICS_TOKEN"):
        cfg.metrics.token()
    monkeypatch.setenv("XDC_TEST_METRICS_TOKEN", "a-token-long-enough-0123")
    assert cfg.metrics.token() == "a-token-long-enough-0123"
    assert parse_config(_cfg(metrics={"port": 9464})).metrics.token() is None
