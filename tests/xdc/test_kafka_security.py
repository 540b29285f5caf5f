"""Kafka client security: the config's settings as client settings (pure), and real brokers that
require TLS + SASL (the secure stack): clients work, and a wrong password, an untrusted CA or a
missing client certificate fail within seconds with a KafkaAuthError naming the broker."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from mirror.runner import Mirror
from tests.conftest import SecureStack
from tests.mirror.chaos_support import variant
from tests.support import brokers, produce, read_topic, topo
from xdc.config import Brokers, KafkaSecurity, XdcConfig, parse_config
from xdc.errors import ConfigError, KafkaAuthError
from xdc.io.kafka import ensure_topics, make_consumer, make_producer
from xdc.io.kafka_security import confluent_settings, kafka_python_kwargs
from xdc.topology import Topology, masked_view

PASSWORD = "pw-0123456789-secret"


def _sec(**over: Any) -> KafkaSecurity:
    base: dict[str, Any] = {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                            "sasl_credentials": {"username_env": "T_KUSER", "password_env": "T_KPASS"},
                            "ca_file": "tls/ca.pem", "cert_file": "tls/c.crt", "key_file": "tls/c.key"}
    return KafkaSecurity.model_validate(base | over)


def _dc_config(sec: dict[str, Any]) -> dict[str, Any]:
    dc = {"s3": {"internal_url": "http://127.0.0.1:1", "external_url": "http://127.0.0.1:1",
                 "credentials": {"access_key_env": "T_AK", "secret_key_env": "T_SK"}},
          "kafka": {"bootstrap_servers": ["k1:9093", "k2:9093"], "security": sec}}
    return {"local_dc": "A", "datacenters": {"A": dc}}


# -- pure -----------------------------------------------------------------------------------------
def test_client_settings_resolve_references_and_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_KUSER", "alice")
    monkeypatch.setenv("T_KPASS", PASSWORD)
    cfg = parse_config(_dc_config(_sec().model_dump(mode="json")), base_dir=Path("/etc/xdc"))
    b = brokers(cfg, "A")
    assert b.servers == ("k1:9093", "k2:9093") and str(b) == "k1:9093,k2:9093"
    assert kafka_python_kwargs(b) == {
        "bootstrap_servers": ["k1:9093", "k2:9093"], "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "alice", "sasl_plain_password": PASSWORD,
        "ssl_check_hostname": True, "ssl_cafile": "/etc/xdc/tls/ca.pem", "ssl_certfile": "/etc/xdc/tls/c.crt",
        "ssl_keyfile": "/etc/xdc/tls/c.key", "ssl_password": None}
    assert confluent_settings(b) == {
        "bootstrap.servers": "k1:9093,k2:9093", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "alice", "sasl.password": PASSWORD, "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": "/etc/xdc/tls/ca.pem", "ssl.certificate.location": "/etc/xdc/tls/c.crt",
        "ssl.key.location": "/etc/xdc/tls/c.key"}
    # a plain address list is a PLAINTEXT cluster
    assert kafka_python_kwargs(["h:1"]) == {"bootstrap_servers": ["h:1"], "security_protocol": "PLAINTEXT"}
    assert confluent_settings(Brokers(("h:1",))) == {"bootstrap.servers": "h:1"}


def test_external_listener_may_have_its_own_security(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_KUSER", "alice")
    monkeypatch.setenv("T_KPASS", PASSWORD)
    data = _dc_config({"protocol": "PLAINTEXT"})
    data["datacenters"]["B"] = {**data["datacenters"]["A"], "kafka": {
        "bootstrap_servers": ["b-internal:9092"], "external_bootstrap_servers": ["b.example.com:9094"],
        "external_security": _sec(cert_file=None, key_file=None).model_dump(mode="json")}}
    cfg = parse_config(data, base_dir=Path("/x"))
    from_a = Topology(cfg, "A").site("B").brokers
    assert from_a.servers == ("b.example.com:9094",)
    assert from_a.security.protocol == "SASL_SSL"
    assert Topology(cfg, "B").site("B").brokers.security.protocol == "PLAINTEXT"  # at home: internal


@pytest.mark.parametrize("sec, words", [
    ({"protocol": "SASL_SSL"}, ["needs sasl_mechanism and sasl_credentials"]),
    ({"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI",
      "sasl_credentials": {"username_env": "U", "password_env": "P"}}, ["sasl_mechanism"]),
    ({"protocol": "PLAINTEXT", "ca_file": "ca.pem"}, ["has no TLS"]),
    ({"protocol": "SSL", "cert_file": "c.crt"}, ["cert_file and key_file go together"]),
    ({"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_credentials": {"username_env": "U"}},
     ["username_env and password_env"]),
    ({"protocol": "SSL", "sasl_mechanism": "PLAIN"}, ["has no SASL"]),
    ({"protocol": "TLS"}, ["protocol"]),
])
def test_bad_security_settings_are_refused(sec: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_dc_config(sec))
    for w in words:
        assert w in str(err.value)


def test_config_check_masks_the_kafka_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_KUSER", "alice")
    monkeypatch.setenv("T_KPASS", PASSWORD)
    view = masked_view(Topology(parse_config(_dc_config(_sec().model_dump(mode="json")))))
    creds = view["datacenters"]["A"]["kafka"]["security"]["sasl_credentials"]
    assert creds["resolved"] == {"username": "****", "password": "****"}
    assert PASSWORD not in repr(view)
    monkeypatch.delenv("T_KPASS")
    creds = masked_view(Topology(parse_config(_dc_config(_sec().model_dump(mode="json")))))["datacenters"]["A"]["kafka"]
    assert "NOT RESOLVED" in creds["security"]["sasl_credentials"]["resolved"] and "T_KPASS" in repr(creds)


# -- real brokers with TLS + SASL ---------------------------------------------------------------
def _fails_fast(fn: Any, *words: str, within_s: float = 5.0) -> KafkaAuthError:
    t0 = time.monotonic()
    with pytest.raises(KafkaAuthError) as err:
        fn()
    took = time.monotonic() - t0
    assert took < within_s, f"took {took:.1f}s to fail"
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not err.value.retriable
    return err.value


def test_clients_work_over_sasl_ssl_scram_and_plain_with_mtls(secure_cfg: XdcConfig, tag: str) -> None:
    for dc in ("A", "B"):
        topic = secure_cfg.dc(dc).kafka.topics.events
        sent = [(f"{dc}{i}".encode(), f"value {i} in {dc}".encode()) for i in range(50)]
        produce(secure_cfg, dc, topic, sent)
        got = read_topic(secure_cfg, dc, topic)
        assert sorted((r.key, r.value) for r in got) == sorted(sent)
    b = brokers(secure_cfg, "B")
    assert b.security.sasl_mechanism == "PLAIN" and b.security.cert_file is not None
    assert brokers(secure_cfg, "A").security.sasl_mechanism == "SCRAM-SHA-512"
    # a consumer group over SASL_SSL joins and reads (group coordinator path)
    c = make_consumer(brokers(secure_cfg, "A"), f"{tag}-g", [secure_cfg.dc("A").kafka.topics.events])
    try:
        n, deadline = 0, time.monotonic() + 30
        while n < 50 and time.monotonic() < deadline:
            n += sum(len(v) for v in c.poll(timeout_ms=500).values())
        assert n == 50
    finally:
        c.close()


def test_wrong_password_fails_fast_naming_the_broker(secure_cfg: XdcConfig, secure_stack: SecureStack,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    right = secure_stack.creds["XDC_A_KAFKA_PASSWORD"]
    monkeypatch.setenv("XDC_A_KAFKA_PASSWORD", "not-the-password")
    server = brokers(secure_cfg, "A").servers[0]
    for make in (lambda: make_producer(brokers(secure_cfg, "A")),
                 lambda: make_consumer(brokers(secure_cfg, "A"), "g", ["t"]),
                 lambda: ensure_topics(brokers(secure_cfg, "A"), ["t"], 1)):
        err = _fails_fast(make, f"Kafka broker {server}", "SASL SCRAM-SHA-512", "XDC_A_KAFKA_PASSWORD")
        assert "not-the-password" not in str(err) and right not in str(err)
    # PLAIN on B, and the mirror itself: it fails at start, not after its retries
    monkeypatch.setenv("XDC_B_KAFKA_PASSWORD", "not-the-password")
    _fails_fast(lambda: Mirror(topo(secure_cfg, "B")), f"Kafka broker {brokers(secure_cfg, 'B').servers[0]}", "PLAIN")


def test_untrusted_ca_fails_fast(secure_cfg: XdcConfig, secure_stack: SecureStack) -> None:
    other = str(secure_stack.tls["other-ca.pem"])
    cfg = variant(secure_cfg, {"datacenters": {"A": {"kafka": {"security": {"ca_file": other}}}}})
    server = brokers(cfg, "A").servers[0]
    _fails_fast(lambda: make_producer(brokers(cfg, "A")), f"Kafka broker {server}", "certificate verify failed",
                "ca_file")


def test_broker_requiring_client_certificates_refuses_a_client_without(secure_cfg: XdcConfig) -> None:
    sec = secure_cfg.dc("B").kafka.security.model_dump(mode="json") | {"cert_file": None, "key_file": None}
    cfg = variant(secure_cfg, {"datacenters": {"B": {"kafka": {"security": sec}}}})
    _fails_fast(lambda: make_producer(brokers(cfg, "B")), f"Kafka broker {brokers(cfg, 'B').servers[0]}",
                "client certificate")
