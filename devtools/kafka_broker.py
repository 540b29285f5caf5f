"""Apache Kafka for the local stack: one KRaft node (broker + controller) per datacenter.

The jars come from Maven Central through `devtools/maven/kafka/pom.xml`, fetched once into
`.xdc/maven/kafka/` (by scripts/setup.sh, or here on first use). A broker lives in one directory:
`server.properties` (mode 0600: it may hold SASL passwords), `log4j2.properties`, and `data/`
(its log on disk: messages and committed offsets survive a kill -9 and a start on the same
directory). devtools.stack starts and stops the process with `command()`; this module only prepares.

A datacenter's client listener can be TLS (+ SASL PLAIN or SCRAM, + client certificates): see
`SecureListener`. Certificates come from the caller (the tests make them with trustme).
"""
from __future__ import annotations

import base64
import fcntl
import os
import re
import secrets
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from xdc.errors import XdcError

ROOT = Path(__file__).resolve().parents[1]
POM = ROOT / "devtools" / "maven" / "kafka" / "pom.xml"

def _pom_version() -> str:
    m = re.search(r"<artifactId>kafka_2\.13</artifactId>\s*<version>([^<]+)</version>", POM.read_text())
    return m.group(1) if m else "unknown"


KAFKA_VERSION = _pom_version()  # the pom is the one place it is written
STARTED_LINE = "Kafka Server started"  # KafkaRaftServer logs it once the broker serves clients
CLIENT_LISTENER = "CLIENT"  # the one listener clients use (and the broker itself, inter-broker)
BROKER_USER = "xdc-broker"  # the broker's own SASL identity on its listener

__all__ = ["KafkaBrokerError", "SecureListener", "Addresses", "jars_dir", "ensure_jars", "prepare", "ports", "command",
           "started_since", "KAFKA_VERSION"]


class KafkaBrokerError(XdcError):
    pass


@dataclass(frozen=True)
class SecureListener:
    """A TLS client listener, with SASL unless `sasl_mechanism` is None (then plain SSL).

    `cert_file`/`key_file`: the broker's certificate chain and private key (PEM, any key format),
    signed by `ca_file`. With `client_cert_file`/`client_key_file` the broker requires client
    certificates signed by `ca_file` (mTLS) and the stack's config presents these.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    sasl_mechanism: str | None = "SCRAM-SHA-512"  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @property
    def protocol(self) -> str:
        return "SASL_SSL" if self.sasl_mechanism else "SSL"

    @property
    def mtls(self) -> bool:
        return self.client_cert_file is not None


@dataclass(frozen=True)
class Addresses:
    """Where a broker listens when its datacenter has a network of its own (the stack's WAN mode):
    its own datacenter's clients on `internal`:`port` (listener CLIENT), the other datacenter's on
    `external`:`external_port` (listener EXTERNAL); each listener advertises its own address, so a
    client stays on the side of the link it came in by. The controller stays on 127.0.0.1."""

    internal: str
    external: str
    port: int = 9092
    external_port: int = 9093
    controller_port: int = 9094


# -- jars ---------------------------------------------------------------------------------------
def jars_dir() -> Path:
    """Where the broker's jars are (XDC_KAFKA_JARS overrides the repository's .xdc/maven/kafka)."""
    return Path(os.environ.get("XDC_KAFKA_JARS") or ROOT / ".xdc" / "maven" / "kafka")


def ensure_jars() -> Path:
    """The jars directory, fetched with Maven once if it is not complete yet."""
    d = jars_dir()
    done = d / ".complete"  # holds the version fetched: a new pom version fetches again
    if _fetched(done):
        return d
    if not shutil.which("java"):
        raise KafkaBrokerError("no `java` on PATH: Apache Kafka 4 needs Java 17+ "
                               "(scripts/setup.sh installs Debian's default-jdk-headless)")
    mvn = shutil.which("mvn")
    if not mvn:
        raise KafkaBrokerError(f"Apache Kafka jars are not in {d} and there is no `mvn` to fetch them: "
                               "run scripts/setup.sh (installs Debian's maven) or `apt-get install maven`")
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / ".kafka-fetch.lock", "w") as lock:  # tests in parallel fetch once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fetched(done):
            return d
        tmp = d.parent / (d.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run([mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                            f"-DoutputDirectory={tmp}"], capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            raise KafkaBrokerError(f"fetching Apache Kafka with Maven failed (exit {r.returncode}):\n"
                                   f"{(r.stdout + r.stderr)[-3000:]}")
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
        done.write_text(KAFKA_VERSION + "\n")
    return d


def _fetched(done: Path) -> bool:
    try:
        return done.read_text().strip() == KAFKA_VERSION
    except OSError:
        return False


def _classpath() -> str:
    return str(ensure_jars() / "*")


# -- one broker's directory ---------------------------------------------------------------------
def prepare(broker_dir: Path, port: int, controller_port: int, *, secure: SecureListener | None = None,
            users: dict[str, str] | None = None, addresses: Addresses | None = None) -> None:
    """Write the broker's config and format its storage. `users`: SASL client users (name ->
    password). Idempotent on a formatted directory (its data is kept: that is a restart)."""
    broker_dir.mkdir(parents=True, exist_ok=True)
    data = broker_dir / "data"
    if (data / "meta.properties").exists():
        return
    broker_password = secrets.token_urlsafe(18)
    props = _properties(broker_dir, port, controller_port, secure, users or {}, broker_password, addresses)
    cfg = broker_dir / "server.properties"
    cfg.touch(mode=0o600)
    cfg.chmod(0o600)
    cfg.write_text(props)
    (broker_dir / "log4j2.properties").write_text(LOG4J2)
    if secure is not None:
        _write_keystore(secure, broker_dir / "keystore.pem")
    cluster_id = _cluster_id()
    cmd = [_java(), "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
           f"-Dlog4j2.configurationFile={broker_dir / 'log4j2.properties'}", "-cp", _classpath(),
           "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(cfg)]
    mech = secure.sasl_mechanism if secure else None
    if mech and mech.startswith("SCRAM-"):  # SCRAM users live in the cluster metadata from the start
        for name, password in {BROKER_USER: broker_password, **(users or {})}.items():
            cmd += ["--add-scram", f"{mech}=[name={name},password={password}]"]
    # The output lists the SCRAM salts and keys and the command line holds the passwords:
    # neither goes to a log or an error message.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        raise KafkaBrokerError(f"formatting the Kafka storage in {data} failed (exit {r.returncode}): "
                               f"{_last_error(r.stdout + r.stderr)}")


def ports(broker_dir: Path) -> tuple[int, int] | None:
    """(client port, controller port) of a broker directory prepared before, else None."""
    cfg = broker_dir / "server.properties"
    if not (broker_dir / "data" / "meta.properties").exists() or not cfg.exists():
        return None
    m = re.search(r"^listeners=\w+://127\.0\.0\.1:(\d+),CONTROLLER://127\.0\.0\.1:(\d+)$", cfg.read_text(), re.M)
    return (int(m.group(1)), int(m.group(2))) if m else None


def command(broker_dir: Path, heap_mib: int = 256) -> list[str]:
    """The broker's command line: a small heap, serial GC, C1 only (start fast, stay small)."""
    return [_java(), f"-Xms{min(128, heap_mib)}m", f"-Xmx{heap_mib}m", "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={broker_dir / 'log4j2.properties'}",
            "-cp", _classpath(), "kafka.Kafka", str(broker_dir / "server.properties")]


def started_since(log_path: Path, offset: int) -> bool:
    """True once the broker logged that it started, after byte `offset` of its log."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            return STARTED_LINE.encode() in f.read()
    except OSError:
        return False


def _cluster_id() -> str:
    """22 characters of URL-safe base64 (a UUID), never starting with '-': the tool would take it for
    an option (Kafka's own Uuid.randomUuid avoids that too)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _java() -> str:
    java = shutil.which("java")
    if not java:
        raise KafkaBrokerError("no `java` on PATH: Apache Kafka 4 needs Java 17+")
    return java


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and "password" not in ln.lower()
             and "storedKey" not in ln]
    return " | ".join(lines[-5:])[-1500:]


def _jaas_quote(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.@+=-]+", value):
        raise KafkaBrokerError("SASL user names and passwords of the local stack must be [A-Za-z0-9_.@+=-]")
    return value


def _listeners(port: int, controller_port: int, protocol: str, addresses: Addresses | None) -> list[str]:
    if addresses is None:
        return [f"listeners={CLIENT_LISTENER}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners={CLIENT_LISTENER}://127.0.0.1:{port}",
                f"listener.security.protocol.map={CLIENT_LISTENER}:{protocol},CONTROLLER:PLAINTEXT"]
    a = addresses
    return [f"listeners={CLIENT_LISTENER}://{a.internal}:{a.port},EXTERNAL://{a.external}:{a.external_port},"
            f"CONTROLLER://127.0.0.1:{a.controller_port}",
            f"advertised.listeners={CLIENT_LISTENER}://{a.internal}:{a.port},EXTERNAL://{a.external}:{a.external_port}",
            f"listener.security.protocol.map={CLIENT_LISTENER}:{protocol},EXTERNAL:{protocol},CONTROLLER:PLAINTEXT"]


def _properties(broker_dir: Path, port: int, controller_port: int, secure: SecureListener | None,
                users: dict[str, str], broker_password: str, addresses: Addresses | None = None) -> str:
    protocol = secure.protocol if secure else "PLAINTEXT"
    if addresses is not None:
        port, controller_port = addresses.port, addresses.controller_port
    lines = [
        "# written by devtools/kafka_broker.py: one KRaft node, broker + controller",
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
        *_listeners(port, controller_port, protocol, addresses),
        "controller.listener.names=CONTROLLER",
        f"inter.broker.listener.name={CLIENT_LISTENER}",
        f"log.dirs={broker_dir / 'data'}",
        # one node: every internal topic has one replica; few partitions start faster
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=4",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=4",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        # the crash tests give their consumers a 2 s session so a killed member is replaced fast;
        # Kafka refuses sessions under 6 s by default (INVALID_SESSION_TIMEOUT)
        "group.min.session.timeout.ms=1000",
        # as large as xdc.io.kafka.make_producer's requests (16 MiB; Kafka's default is 1 MiB): an
        # oversized event then reaches the mirror's own guard (mirror.max_message_bytes) and the
        # dead-letter topic, as on a cluster configured for big messages
        "message.max.bytes=16777216",
        # after a kill -9 the restarted node waits for its old registration's session to expire
        # (9 s by default) before it serves again: keep that short, with frequent heartbeats
        "broker.session.timeout.ms=4000",
        # retention is applied every second (Kafka: every 5 minutes, after a 30 s start delay), so a
        # topic given a short retention.ms loses its old events in seconds, as a production topic
        # does in days (the offset-gap tests); topics with the default retention are not affected
        "log.retention.check.interval.ms=1000",
        "log.initial.task.delay.ms=0",
        "broker.heartbeat.interval.ms=500",
        "num.network.threads=2",
        "num.io.threads=4",
    ]
    if secure is not None:
        ln = f"listener.name.{CLIENT_LISTENER.lower()}"
        lines += [
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={broker_dir / 'keystore.pem'}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={secure.ca_file}",
        ]
        if secure.mtls:
            # on a SASL_SSL listener client certificates are asked for only when set per listener
            lines += [f"{ln}.ssl.client.auth=required"]
        mech = secure.sasl_mechanism
        if mech:
            lines += [f"sasl.enabled.mechanisms={mech}", f"sasl.mechanism.inter.broker.protocol={mech}"]
            bp = _jaas_quote(broker_password)
            if mech == "PLAIN":
                known = " ".join(f'user_{_jaas_quote(n)}="{_jaas_quote(p)}"'
                                 for n, p in {BROKER_USER: broker_password, **users}.items())
                lines.append(f"{ln}.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule "
                             f'required username="{BROKER_USER}" password="{bp}" {known};')
            else:
                lines.append(f"{ln}.{mech.lower()}.sasl.jaas.config=org.apache.kafka.common.security.scram."
                             f'ScramLoginModule required username="{BROKER_USER}" password="{bp}";')
    return "\n".join(lines) + "\n"


def _write_keystore(secure: SecureListener, path: Path) -> None:
    """Kafka's PEM keystore: the private key as unencrypted PKCS#8, then the certificate chain."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(secure.key_file).read_bytes(), password=None)
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(pkcs8 + Path(secure.cert_file).read_bytes())


# Console only: the stack sends the broker's stdout to its log file in the run directory.
LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
# the full config dumps (thousands of lines per start) and per-partition chatter
logger.config.name = org.apache.kafka.common.config
logger.config.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.partition.name = kafka.cluster.Partition
logger.partition.level = WARN
logger.logloader.name = org.apache.kafka.storage.internals.log
logger.logloader.level = WARN
"""
