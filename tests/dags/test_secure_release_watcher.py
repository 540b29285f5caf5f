"""The release watcher's Kafka side against brokers that take only SASL_SSL (the secure stack):
the `kafka` connection extras the project builds, the provider's real KafkaMessageQueueTrigger run
in this process, and a fast, clear failure for a wrong password or an untrusted CA."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from cache_client.prewarm.release import publish_release
from tests.support import brokers, site
from xdc.app.airflow_support import (
    check_kafka_connection,
    kafka_connection_env,
    kafka_connection_extra,
)
from xdc.config import XdcConfig
from xdc.errors import KafkaAuthError
from xdc.events import ReleaseEvent


def _trigger_event(cfg: XdcConfig, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any],
                   timeout_s: float) -> Any:
    """The first TriggerEvent of the provider's trigger on A's releases topic (as the triggerer
    runs it), through the connection AIRFLOW_CONN_XDC_KAFKA_TEST."""
    from airflow.providers.apache.kafka.triggers.msg_queue import (
        KafkaMessageQueueTrigger,
    )
    from airflow.providers.common.compat.module_loading import import_string

    monkeypatch.setenv("AIRFLOW_CONN_XDC_KAFKA_TEST", json.dumps({"conn_type": "kafka", "extra": extra}))
    watcher = KafkaMessageQueueTrigger(topics=[cfg.dc("A").kafka.topics.releases], kafka_config_id="xdc_kafka_test",
                                       apply_function="xdc.app.airflow_support.is_release_message", poll_interval=0.2)
    # what the triggerer runs: the trigger rebuilt from its serialised form (the provider's
    # AwaitMessageTrigger), then cleaned up when it ends
    classpath, kwargs = watcher.serialize()
    trigger = import_string(classpath)(**kwargs)

    async def first() -> Any:
        gen = trigger.run()
        try:
            return await asyncio.wait_for(gen.__anext__(), timeout_s)
        finally:
            await gen.aclose()
            await trigger.cleanup()
    return asyncio.run(first())


def test_release_watcher_trigger_over_sasl_ssl(secure_cfg: XdcConfig, tag: str, airflow_home: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    release = ReleaseEvent(dataset=f"ds-{tag}", version="v1", manifest="/lists/v1.txt", time=time.time(),
                           datacenters=("A", "B"))
    publish_release(site(secure_cfg, "A"), release)  # kafka-python over SASL_SSL
    extra = kafka_connection_extra(brokers(secure_cfg, "A"), f"{tag}-watcher")
    assert extra["security.protocol"] == "SASL_SSL" and extra["sasl.mechanism"] == "SCRAM-SHA-512"
    check_kafka_connection(extra=extra)
    event = _trigger_event(secure_cfg, monkeypatch, extra, timeout_s=60)
    assert event.payload["dataset"] == f"ds-{tag}" and event.payload["version"] == "v1"
    assert event.payload["source"]["topic"] == secure_cfg.dc("A").kafka.topics.releases
    # and the connection as the triggerer sees it: by id, from the environment
    name, value = kafka_connection_env("xdc_kafka_check", brokers(secure_cfg, "A"), f"{tag}-check")
    monkeypatch.setenv(name, value)
    check_kafka_connection("xdc_kafka_check")


def test_wrong_password_or_untrusted_ca_fails_fast(secure_cfg: XdcConfig, secure_stack: Any, tag: str,
                                                   airflow_home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    good = kafka_connection_extra(brokers(secure_cfg, "A"), f"{tag}-watcher")
    server = brokers(secure_cfg, "A").servers[0]
    cases = {"password": (good | {"sasl.password": "not-the-password"}, ["SASL SCRAM-SHA-512", "invalid credentials"]),
             "ca": (good | {"ssl.ca.location": str(secure_stack.tls["other-ca.pem"])},
                    ["TLS", "certificate verify failed", "ca_file"])}
    for what, (extra, words) in cases.items():
        t0 = time.monotonic()
        with pytest.raises(KafkaAuthError) as err:
            check_kafka_connection(extra=extra)
        assert time.monotonic() - t0 < 5, what
        for w in [f"Kafka broker {server}", *words]:
            assert w in str(err.value), (what, w, str(err.value))
        assert "not-the-password" not in str(err.value)
    # the provider's trigger itself stops at once with the broker's reason (no silent retry loop)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="(?i)authentication") as err:
        _trigger_event(secure_cfg, monkeypatch, cases["password"][0], timeout_s=30)
    assert time.monotonic() - t0 < 10 and not isinstance(err.value, TimeoutError)
