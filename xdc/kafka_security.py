"""Kafka client security at one place: the config's `KafkaSecurity` as kafka-python keyword
arguments and as confluent-kafka settings, and a fast check that a broker accepts them.

Why the check: with a wrong password or an untrusted certificate kafka-python only logs the cause
and retries its bootstrap until a timeout (30 s), then says "Unable to bootstrap". `check_brokers`
opens one connection first and turns the real cause into a `KafkaAuthError` that names the broker.
Secrets are resolved here, at use, and never put into a message or a log line.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from xdc.config import Brokers, KafkaSecurity
from xdc.errors import ConfigError, KafkaAuthError

log = logging.getLogger(__name__)

__all__ = ["as_brokers", "kafka_python_kwargs", "confluent_settings", "check_brokers"]


def as_brokers(brokers: Brokers | Sequence[str]) -> Brokers:
    """A plain list of addresses is a PLAINTEXT cluster (tests, tools); a `Brokers` is kept."""
    if isinstance(brokers, Brokers):
        return brokers
    if isinstance(brokers, str):
        return Brokers(tuple(s.strip() for s in brokers.split(",") if s.strip()))
    return Brokers(tuple(brokers))


def kafka_python_kwargs(brokers: Brokers | Sequence[str]) -> dict[str, Any]:
    """bootstrap_servers plus the security keyword arguments of kafka-python's clients
    (KafkaProducer, KafkaConsumer, KafkaAdminClient take the same names)."""
    b = as_brokers(brokers)
    sec = b.security
    kw: dict[str, Any] = {"bootstrap_servers": list(b.servers), "security_protocol": sec.protocol}
    if sec.protocol.startswith("SASL_"):
        assert sec.sasl_credentials is not None  # the model guarantees it
        user, password = sec.sasl_credentials.resolve()
        kw.update(sasl_mechanism=sec.sasl_mechanism, sasl_plain_username=user, sasl_plain_password=password)
    if sec.protocol.endswith("SSL"):
        kw.update(ssl_check_hostname=sec.check_hostname,
                  ssl_cafile=str(sec.ca_file) if sec.ca_file else None,
                  ssl_certfile=str(sec.cert_file) if sec.cert_file else None,
                  ssl_keyfile=str(sec.key_file) if sec.key_file else None,
                  ssl_password=_env(sec.key_password_env))
    return kw


def confluent_settings(brokers: Brokers | Sequence[str]) -> dict[str, Any]:
    """bootstrap.servers plus the security settings of confluent-kafka (librdkafka) clients."""
    b = as_brokers(brokers)
    sec = b.security
    out: dict[str, Any] = {"bootstrap.servers": ",".join(b.servers)}
    if sec.protocol == "PLAINTEXT":
        return out
    out["security.protocol"] = sec.protocol
    if sec.protocol.startswith("SASL_"):
        assert sec.sasl_credentials is not None
        user, password = sec.sasl_credentials.resolve()
        out.update({"sasl.mechanism": sec.sasl_mechanism, "sasl.username": user, "sasl.password": password})
    if sec.protocol.endswith("SSL"):
        out["ssl.endpoint.identification.algorithm"] = "https" if sec.check_hostname else "none"
        if sec.ca_file:
            out["ssl.ca.location"] = str(sec.ca_file)
        if sec.cert_file and sec.key_file:
            out["ssl.certificate.location"] = str(sec.cert_file)
            out["ssl.key.location"] = str(sec.key_file)
        if sec.key_password_env:
            out["ssl.key.password"] = _env(sec.key_password_env)
    return out


def check_brokers(brokers: Brokers | Sequence[str], *, timeout_s: float = 10.0) -> None:
    """Raise KafkaAuthError at once if a secured broker refuses our credentials or its certificate
    is not trusted. Unreachable brokers are left to the client's own retries (not an auth matter).
    PLAINTEXT has nothing to check."""
    b = as_brokers(brokers)
    if b.security.protocol == "PLAINTEXT":
        return
    from kafka.consumer.group import KafkaConsumer
    from kafka.net.compat import KafkaNetClient

    conf = dict(KafkaConsumer.DEFAULT_CONFIG)
    conf.update(kafka_python_kwargs(b), request_timeout_ms=int(timeout_s * 1000))
    # kafka-python 3.0's own connection manager: one connection per bootstrap address, whose
    # init future fails with the TLS or SASL error itself (the public clients only log it).
    client = KafkaNetClient(**conf)
    try:
        for server, node in zip(b.servers, client.cluster.bootstrap_brokers(), strict=False):
            conn = client._manager.get_connection(node.node_id, timeout_ms=int(timeout_s * 1000))
            client._net.poll(timeout_ms=int(timeout_s * 1000), future=conn.init_future)
            fut = conn.init_future
            if fut.is_done and fut.succeeded():
                return  # one broker accepted us: the settings are right
            if fut.is_done:
                _raise_if_auth(server, b.security, fut.exception)
    finally:
        client.close()


def _raise_if_auth(server: str, sec: KafkaSecurity, exc: BaseException | None) -> None:
    import kafka.errors as errors

    detail = str(exc)
    if isinstance(exc, (errors.SaslAuthenticationFailedError, errors.AuthorizationError)):
        cred = sec.sasl_credentials
        where = (f"Airflow connection {cred.airflow_conn_id!r}" if cred and cred.airflow_conn_id
                 else f"env {cred.username_env} / {cred.password_env}" if cred else "?")
        raise KafkaAuthError(f"Kafka broker {server} refused SASL {sec.sasl_mechanism} authentication: "
                             f"{detail.split(': ', 1)[-1]} (credentials from {where})") from None
    if "Handshake failed" in detail or "SSL" in detail:
        hint = ("is kafka.security.ca_file the CA that signed the broker's certificate?"
                if "CERTIFICATE_VERIFY_FAILED" in detail else "check the TLS settings of kafka.security")
        raise KafkaAuthError(f"Kafka broker {server}: TLS handshake failed: "
                             f"{detail.removeprefix('Handshake failed: ')} ({hint})") from None
    log.debug("kafka check of %s: %s (left to the client's retries)", server, type(exc).__name__)


def _env(name: str | None) -> str | None:
    if name is None:
        return None
    if name not in os.environ:
        raise ConfigError(f"kafka security: environment variable {name} is not set")
    return os.environ[name]
