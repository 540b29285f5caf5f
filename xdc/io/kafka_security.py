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
import time
from collections.abc import Mapping, Sequence
from typing import Any

from xdc.config import Brokers, KafkaSecurity, SaslCredentials
from xdc.errors import ConfigError, KafkaAuthError, KafkaError

log = logging.getLogger(__name__)

__all__ = ["as_brokers", "kafka_python_kwargs", "confluent_settings", "check_brokers", "check_confluent"]


def as_brokers(brokers: Brokers | Sequence[str]) -> Brokers:
    """A plain list of addresses is a PLAINTEXT cluster (tests, tools); a `Brokers` is kept."""
    if isinstance(brokers, Brokers):
        return brokers
    if isinstance(brokers, str):
        return Brokers(tuple(s.strip() for s in brokers.split(",") if s.strip()))
    return Brokers(tuple(brokers))


class _RedactSecrets(logging.Filter):
    """Replace the passwords this process resolved with *** in kafka-python's log records: at DEBUG
    it logs every request and the bytes it sends, and SASL PLAIN sends the password in clear."""

    secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            if any(s in msg for s in self.secrets):
                for s in sorted(self.secrets, key=len, reverse=True):
                    msg = msg.replace(s, "***")
                record.msg, record.args = msg, None
        return True


_REDACT = _RedactSecrets()


def _keep_out_of_logs(secret: str) -> None:
    """Register a secret with the filter on every kafka-python logger (a logger's filter sees only
    its own records, not its children's, so each one gets it)."""
    if not secret or secret in _REDACT.secrets:
        return
    _REDACT.secrets.update({secret, repr(secret.encode())[2:-1]})  # also as it shows in a bytes repr
    import kafka  # noqa: F401 - its modules create their loggers on import

    for name in [n for n in logging.root.manager.loggerDict if n == "kafka" or n.startswith("kafka.")]:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


def kafka_python_kwargs(brokers: Brokers | Sequence[str]) -> dict[str, Any]:
    """bootstrap_servers plus the security keyword arguments of kafka-python's clients
    (KafkaProducer, KafkaConsumer, KafkaAdminClient take the same names)."""
    b = as_brokers(brokers)
    sec = b.security
    kw: dict[str, Any] = {"bootstrap_servers": list(b.servers), "security_protocol": sec.protocol}
    if sec.protocol.startswith("SASL_"):
        assert sec.sasl_credentials is not None  # the model guarantees it
        user, password = sec.sasl_credentials.resolve()
        _keep_out_of_logs(password)
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


def check_brokers(brokers: Brokers | Sequence[str], *, timeout_s: float = 10.0, tries: int = 3) -> None:
    """Raise KafkaAuthError at once if a secured broker refuses our credentials or its certificate
    is not trusted. Unreachable brokers are left to the client's own retries (not an auth matter).
    PLAINTEXT has nothing to check."""
    b = as_brokers(brokers)
    if b.security.protocol == "PLAINTEXT":
        return
    closed_in_sasl = 0
    for server in b.servers:
        for _ in range(tries):
            exc = _probe(b, server, timeout_s)
            if exc is None:
                return  # one broker accepted us: the settings are right
            _raise_if_auth(server, b.security, exc)
            # kafka-python 3.0.12 drops the bytes that arrive with the connection's close: the
            # broker's SASL error reply then shows up as a bare "socket disconnected". Try again.
            if not (b.security.protocol.startswith("SASL_") and "socket disconnected" in str(exc)):
                break
            closed_in_sasl += 1
        else:
            cred = b.security.sasl_credentials
            raise KafkaAuthError(f"Kafka broker {server} closed the connection during SASL "
                                 f"{b.security.sasl_mechanism} authentication {tries} times: wrong user or "
                                 f"password? (credentials from {_where(cred)})")


def _probe(b: Brokers, server: str, timeout_s: float) -> BaseException | None:
    """One connection to `server` with the full client set-up (TLS, ApiVersions, SASL): the
    exception it failed with, or None. Uses kafka-python's own connection manager, whose init
    future fails with the TLS or SASL error itself (the public clients only log it)."""
    from kafka.consumer.group import KafkaConsumer
    from kafka.net.compat import KafkaNetClient

    conf = dict(KafkaConsumer.DEFAULT_CONFIG)
    conf.update(kafka_python_kwargs(Brokers((server,), b.security)), request_timeout_ms=int(timeout_s * 1000))
    client = KafkaNetClient(**conf)
    try:
        node = client.cluster.bootstrap_brokers()[0]
        conn = client._manager.get_connection(node.node_id, timeout_ms=int(timeout_s * 1000))
        client._net.poll(timeout_ms=int(timeout_s * 1000), future=conn.init_future)
        fut = conn.init_future
        if not fut.is_done:
            return TimeoutError(f"no answer within {timeout_s:.0f}s")
        return None if fut.succeeded() else fut.exception
    finally:
        client.close()


def check_confluent(settings: Mapping[str, Any], *, timeout_s: float = 10.0) -> None:
    """The same check for confluent-kafka settings (an Airflow `kafka` connection's extra): raise
    KafkaAuthError when librdkafka reports an authentication or TLS failure, KafkaError when no
    broker answers within `timeout_s`."""
    from confluent_kafka.admin import AdminClient

    conf = {k: v for k, v in settings.items() if "." in k and not k.startswith(("group.", "auto.", "session.",
                                                                                 "heartbeat.", "enable.auto"))}
    errors: list[Any] = []
    admin = AdminClient({**conf, "error_cb": errors.append, "log_level": 0})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=0.5)
            return
        except Exception:  # noqa: BLE001 - the cause arrives through error_cb
            admin.poll(0.1)
        for e in errors:
            name, text = e.name(), e.str()
            server, _, detail = text.partition("/bootstrap: ") if "/bootstrap: " in text else ("", "", text)
            server = server.split("://", 1)[-1] or str(conf.get("bootstrap.servers"))
            if name == "_AUTHENTICATION":
                raise KafkaAuthError(f"Kafka broker {server} refused SASL {conf.get('sasl.mechanism')} "
                                     f"authentication: {detail}")
            if name == "_SSL" or (name == "_TRANSPORT" and "SSL" in detail):
                raise KafkaAuthError(f"Kafka broker {server}: TLS failed: {detail} ({_tls_hint(detail)})")
    raise KafkaError(f"Kafka brokers {conf.get('bootstrap.servers')} did not answer within {timeout_s:.0f}s")


def _raise_if_auth(server: str, sec: KafkaSecurity, exc: BaseException | None) -> None:
    import kafka.errors as errors

    detail = str(exc)
    if isinstance(exc, (errors.SaslAuthenticationFailedError, errors.AuthorizationError,
                        errors.UnsupportedSaslMechanismError)):
        raise KafkaAuthError(f"Kafka broker {server} refused SASL {sec.sasl_mechanism} authentication: "
                             f"{detail.split(': ', 1)[-1]} (credentials from {_where(sec.sasl_credentials)})") from None
    if "Handshake failed" in detail or "SSL" in detail:
        raise KafkaAuthError(f"Kafka broker {server}: TLS handshake failed: {_tls_detail(detail)} "
                             f"({_tls_hint(detail)})") from None
    log.debug("kafka check of %s: %s (left to the client's retries)", server, type(exc).__name__)


def _tls_detail(detail: str) -> str:
    return detail.replace("KafkaConnectionError: ", "").replace("Handshake failed: ", "")


def _tls_hint(detail: str) -> str:
    d = detail.upper().replace(" ", "_")  # OpenSSL (kafka-python) and librdkafka spell it differently
    if "CERTIFICATE_VERIFY_FAILED" in d and "MISMATCH" in d:
        return "the broker's certificate does not name this host: check bootstrap_servers or check_hostname"
    if "CERTIFICATE_VERIFY_FAILED" in d:
        return "is kafka.security.ca_file the CA that signed the broker's certificate?"
    if "BAD_CERTIFICATE" in d or "CERTIFICATE_REQUIRED" in d or "UNKNOWN_CA" in d:
        return "the broker wants a client certificate it trusts: check kafka.security.cert_file / key_file"
    return "check the TLS settings of kafka.security"


def _where(cred: SaslCredentials | None) -> str:
    """Where the credentials come from (names only, never values)."""
    if cred is None:
        return "nowhere: no sasl_credentials"
    if cred.airflow_conn_id:
        return f"Airflow connection {cred.airflow_conn_id!r}"
    return f"env {cred.username_env} / {cred.password_env}"


def _env(name: str | None) -> str | None:
    if name is None:
        return None
    if name not in os.environ:
        raise ConfigError(f"kafka security: environment variable {name} is not set")
    return os.environ[name]
