"""xdc.app.airflow_support: pure pieces (message filter, connection, payload extraction), no servers."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import Message

from xdc.app.airflow_support import (
    RELEASE_ASSET,
    config_path,
    is_release_message,
    kafka_connection_env,
    kafka_connection_extra,
    release_asset,
    release_payloads,
)
from xdc.errors import ConfigError, EventError

RELEASE = {"type": "dataset.released", "dataset": "cams", "version": "v1", "manifest": "/lists/cams-v1.txt",
           "time": "2026-11-23T10:00:00Z"}


def msg(value: Any, offset: int = 7) -> Message:
    raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
    return Message(topic="xdc.releases", partition=1, offset=offset, value=raw)


def test_release_message_returns_payload_with_source() -> None:
    got = is_release_message(msg(RELEASE | {"datacenters": ["idc-a"]}))
    assert got == RELEASE | {"datacenters": ["idc-a"], "source": {"topic": "xdc.releases", "partition": 1,
                                                                  "offset": 7}}
    json.dumps(got)  # lands in the asset event's extra: must be JSON-able


@pytest.mark.parametrize("value", [None, b"", b"not json", b"[1, 2]", {"type": "object.applied"},
                                   {"Records": []}, RELEASE | {"version": ""}, RELEASE | {"time": "soon"},
                                   RELEASE | {"datacenters": "idc-a"}])
def test_other_or_invalid_messages_are_skipped(value: Any) -> None:
    assert not is_release_message(msg(value))


def test_not_a_message_is_skipped() -> None:
    assert is_release_message(object()) is None


def test_kafka_connection_env() -> None:
    name, value = kafka_connection_env("xdc_kafka", ["127.0.0.1:1", "127.0.0.1:2"], "g1", session_timeout_ms=9000)
    assert name == "AIRFLOW_CONN_XDC_KAFKA"
    conn = json.loads(value)
    assert conn["conn_type"] == "kafka"
    assert conn["extra"] == {"bootstrap.servers": "127.0.0.1:1,127.0.0.1:2", "group.id": "g1",
                             "auto.offset.reset": "earliest", "session.timeout.ms": 9000,
                             "heartbeat.interval.ms": 1000}


@pytest.mark.parametrize("bootstrap,group", [([], "g"), (["h:1"], "")])
def test_kafka_connection_extra_refuses_empty(bootstrap: list[str], group: str) -> None:
    with pytest.raises(ConfigError):
        kafka_connection_extra(bootstrap, group)


def test_config_path_from_env(airflow_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDC_CONFIG", "/etc/xdc.yaml")
    assert config_path() == "/etc/xdc.yaml"
    monkeypatch.delenv("XDC_CONFIG")
    with pytest.raises(ConfigError):
        config_path()


def _event(payload: Any) -> SimpleNamespace:
    return SimpleNamespace(extra={"from_trigger": True, "payload": payload})


def test_release_payloads_from_asset_events_and_conf() -> None:
    from airflow.sdk import Asset

    second = RELEASE | {"version": "v2"}
    context = {
        "dag_run": SimpleNamespace(conf={"release": RELEASE}),
        # Several events can land in one run; a payload that is not a release is ignored.
        "triggering_asset_events": {Asset(RELEASE_ASSET): [_event(second), _event("text"), _event(None)]},
    }
    assert release_payloads(context) == [RELEASE, second]
    assert release_payloads({"dag_run": SimpleNamespace(conf={})}) == []


def test_release_payloads_refuses_bad_conf() -> None:
    with pytest.raises(EventError):
        release_payloads({"dag_run": SimpleNamespace(conf={"release": {"type": "dataset.released"}})})


def test_release_asset_watches_topics() -> None:
    asset = release_asset(["xdc.releases"], "xdc_kafka")
    assert asset.name == RELEASE_ASSET
    (watcher,) = asset.watchers
    path, kwargs = watcher.trigger.serialize()
    assert path == "airflow.providers.apache.kafka.triggers.await_message.AwaitMessageTrigger"
    assert kwargs["topics"] == ["xdc.releases"] and kwargs["kafka_config_id"] == "xdc_kafka"
    assert kwargs["apply_function"] == "xdc.app.airflow_support.is_release_message"
