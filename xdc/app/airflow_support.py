"""What the DAGs share with Airflow: config lookup, the Kafka connection, and release events.

Importable without Airflow (and light enough for DAG parsing): Airflow is imported inside the
functions that need it, only where Airflow runs.

A dataset release reaches a DAG like this (read from the installed Airflow 3.3.2 and the Kafka
provider 2.1.0, proven in tests/dags/test_harness.py):

1. ``KafkaMessageQueueTrigger(apply_function="xdc.app.airflow_support.is_release_message")`` runs in the
   triggerer. It calls the function with each confluent-kafka ``Message``; the offset is committed
   whatever the result. A falsy result means "not for us": the trigger then sleeps
   ``poll_interval`` seconds before the next poll, so keep that small on a busy topic.
2. A truthy result becomes ``TriggerEvent(result)``; the trigger stops (the triggerer starts it
   again, with a new consumer that resumes from the committed offset).
3. ``Trigger.submit_event`` records an asset event on every watched asset with
   ``extra = {"from_trigger": True, "payload": <result>}``; so the result must be JSON-able.
4. The scheduler starts a run of each DAG scheduled on the asset. Several events that arrive
   before the run is created land in ONE run, so a task must handle a list of releases:
   ``context["triggering_asset_events"][asset]`` is a list of events whose ``.extra["payload"]``
   is what ``is_release_message`` returned. ``release_payloads(context)`` does this, and also
   accepts ``dag_run.conf["release"]`` (manual runs, ``dag.test(run_conf=...)``).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from xdc.app.env import load_env_file
from xdc.config import Brokers, XdcConfig, load_config
from xdc.errors import ConfigError, EventError
from xdc.events import RELEASE_TYPE, parse_release
from xdc.io.kafka_security import as_brokers, check_confluent, confluent_settings

log = logging.getLogger(__name__)

__all__ = ["CONFIG_VARIABLE", "ENV_FILE_VARIABLE", "RELEASE_ASSET", "config_path", "load_xdc_config",
           "parse_time_config", "schedule_from_env", "mirror_targets", "dc_asset_name", "release_watch",
           "READY_ALIAS", "ready_asset_name",
           "kafka_connection_extra", "kafka_connection_env", "check_kafka_connection", "release_asset",
           "is_release_message", "release_payload", "release_payloads"]

CONFIG_VARIABLE = "xdc_config"  # Airflow Variable holding the config file path
ENV_FILE_VARIABLE = "xdc_env_file"  # Airflow Variable naming an env file (credentials), optional
RELEASE_ASSET = "xdc-release"  # name of the asset the release watcher feeds
DEFAULT_KAFKA_CONN_ID = "xdc_kafka"
DEFAULT_SCHEDULE = "* * * * *"  # every minute


def _variable(name: str) -> str | None:
    try:
        from airflow.sdk import (
            Variable,  # only where Airflow runs; the CLI works without it
        )
    except ImportError:
        return None
    value = Variable.get(name, default=None)
    return str(value) if value else None


def config_path() -> str:
    """The xdc config file path: Airflow Variable ``xdc_config`` if set, else env ``XDC_CONFIG``."""
    path = _variable(CONFIG_VARIABLE) or os.environ.get("XDC_CONFIG")
    if not path:
        raise ConfigError(f"no config file: set the Airflow Variable {CONFIG_VARIABLE!r} or XDC_CONFIG")
    return path


def load_xdc_config(path: str | None = None) -> XdcConfig:
    """The XdcConfig the DAGs run with: `path`, else config_path(). An env file named by the
    Variable `xdc_env_file` or $XDC_ENV_FILE (credentials) is loaded first; nothing else is."""
    env_file = _variable(ENV_FILE_VARIABLE) or os.environ.get("XDC_ENV_FILE")
    if env_file:
        load_env_file(env_file)
    return load_config(path or config_path())


def parse_time_config() -> XdcConfig | None:
    """The config for building DAG structure at parse time, or None when it cannot be read.

    A DAG file must import without a config (CI, a fresh Airflow): its tasks then fail at run time
    with the ConfigError, which names what to set.
    """
    try:
        return load_xdc_config()
    except Exception as exc:  # noqa: BLE001 - any reason: fall back to the config-less DAG shape
        log.info("xdc config not readable while parsing DAGs (%s); using the config-less shape", exc)
        return None


def schedule_from_env(name: str, default: str = DEFAULT_SCHEDULE) -> str | None:
    """A DAG's cron schedule from env `name` ("none"/"manual" -> no schedule)."""
    value = os.environ.get(name, default).strip()
    return None if value.lower() in ("", "none", "manual") else value


def mirror_targets(cfg: XdcConfig) -> list[str]:
    """Datacenters some route mirrors into: one mirror task (and asset) each."""
    return sorted({r.target.dc for r in cfg.routes})


def dc_asset_name(dc: str) -> str:
    """The asset a mirror task updates when it applied objects into `dc`."""
    return f"xdc-dc-{dc}"


READY_ALIAS = "xdc-ready"  # the prewarm DAG's check task emits ready assets through this alias


def ready_asset_name(dataset: str, dc: str) -> str:
    """The asset that gets an event when a version of `dataset` is 100 % cached in `dc`: schedule a
    training DAG on ``Asset(ready_asset_name("cams-2026", "B"))``."""
    return f"xdc-ready-{dataset}-{dc}"


def release_watch(cfg: XdcConfig) -> tuple[list[str], str]:
    """(releases topics, kafka connection id) the release watcher listens to.

    One connection = one broker: the local datacenter's (or the first one's); the releases topics
    of every datacenter whose Kafka is that broker.
    """
    local = cfg.local_dc or next(iter(cfg.datacenters))
    k = cfg.dc(local).kafka
    conn_id = k.airflow_conn_id or DEFAULT_KAFKA_CONN_ID
    same = [d.kafka.topics.releases for d in cfg.datacenters.values()
            if sorted(d.kafka.bootstrap_servers) == sorted(k.bootstrap_servers)]
    return sorted(set(same)), conn_id


def kafka_connection_extra(brokers: Brokers | Sequence[str], group_id: str, *, session_timeout_ms: int = 6000,
                           heartbeat_interval_ms: int = 1000) -> dict[str, Any]:
    """confluent-kafka settings for the provider's ``kafka`` connection (its ``extra`` field),
    with the datacenter's security settings (``Site.brokers`` of the topology: TLS, SASL user and
    password resolved now; the extra is where an Airflow connection keeps its secrets).

    Short session timeout: a group join takes about half of it (45 s default -> ~23 s stall on
    every trigger restart). ``earliest`` so a release published before the watcher's group
    existed is still seen.
    """
    b = as_brokers(brokers)
    if not b.servers:
        raise ConfigError("kafka connection: empty bootstrap list")
    if not group_id:
        raise ConfigError("kafka connection: empty group id")
    return {
        **confluent_settings(b),
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": heartbeat_interval_ms,
    }


def kafka_connection_env(conn_id: str, brokers: Brokers | Sequence[str], group_id: str,
                         **settings: int) -> tuple[str, str]:
    """(``AIRFLOW_CONN_<ID>``, JSON value) defining a ``kafka`` connection through the environment.

    `settings`: session_timeout_ms / heartbeat_interval_ms, as in kafka_connection_extra. The value
    holds the SASL password of a secured broker: hand it to Airflow, never to a log.
    """
    name = "AIRFLOW_CONN_" + conn_id.upper()
    value = json.dumps({"conn_type": "kafka", "extra": kafka_connection_extra(brokers, group_id, **settings)})
    return name, value


def check_kafka_connection(conn_id: str | None = None, *, extra: Mapping[str, Any] | None = None,
                           timeout_s: float = 10.0) -> None:
    """Connect once with a ``kafka`` connection's settings (by id, or the `extra` itself): a wrong
    password or an untrusted certificate raises KafkaAuthError naming the broker, within seconds."""
    if extra is None:
        if not conn_id:
            raise ConfigError("check_kafka_connection: give a connection id or its extra")
        from airflow.sdk import BaseHook

        extra = BaseHook.get_connection(conn_id).extra_dejson
    check_confluent(extra, timeout_s=timeout_s)


def release_asset(topics: list[str], kafka_config_id: str, *, poll_interval: float = 1.0) -> Any:
    """The ``xdc-release`` Asset with its Kafka watcher: schedule a DAG on it (``schedule=[...]``).

    Build it in one place: every DAG that declares the asset must declare the same watcher.
    The topics must exist before the triggerer starts the watcher (on an unknown topic the trigger
    fails and is restarted in a loop). `poll_interval` is also the pause after each message that
    is not a release.
    """
    from airflow.providers.apache.kafka.triggers.msg_queue import (
        KafkaMessageQueueTrigger,
    )
    from airflow.sdk import Asset, AssetWatcher

    trigger = KafkaMessageQueueTrigger(topics=list(topics), kafka_config_id=kafka_config_id,
                                       apply_function=f"{__name__}.is_release_message",
                                       poll_interval=poll_interval)
    return Asset(RELEASE_ASSET, watchers=[AssetWatcher(name="xdc_release_watcher", trigger=trigger)])


def is_release_message(message: Any) -> dict[str, Any] | None:
    """apply_function of the release watcher: the release payload, or None for any other message.

    Never raises: an exception here fails the trigger and stops the watcher. A message that says
    it is a release but does not validate is logged and skipped.
    """
    try:
        raw = message.value()
    except Exception:  # not a Message at all
        log.warning("release watcher: got %r, not a Kafka message", type(message).__name__)
        return None
    if not raw:  # tombstone or empty
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("type") != _release_type():
        return None
    try:
        return release_payload(doc, source=_source(message))
    except EventError as exc:
        log.warning("release watcher: skipping invalid release at %s: %s", _source(message), exc)
        return None


def release_payload(doc: Mapping[str, Any], source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate a release document and return it as a JSON-able dict (plus where it came from)."""
    parse_release(dict(doc))  # the one release schema; raises EventError
    payload = dict(doc)
    if source:
        payload["source"] = dict(source)
    return payload


def release_payloads(context: Mapping[str, Any], asset: Any = None) -> list[dict[str, Any]]:
    """Every release that started this run, oldest first.

    From ``dag_run.conf["release"]`` (a dict or a list of dicts) and from the triggering asset
    events of ``asset`` (default: the ``xdc-release`` asset) whose extra carries a payload.
    """
    out: list[dict[str, Any]] = []
    dag_run = context.get("dag_run")
    conf = getattr(dag_run, "conf", None) or {}
    given = conf.get("release") if isinstance(conf, Mapping) else None
    if isinstance(given, Mapping):
        out.append(release_payload(given))
    elif isinstance(given, list):
        out.extend(release_payload(g) for g in given)
    events = context.get("triggering_asset_events") or {}
    for event in _events_of(events, asset):
        extra = getattr(event, "extra", None) or {}
        payload = extra.get("payload") if isinstance(extra, Mapping) else None
        if isinstance(payload, Mapping) and payload.get("type") == _release_type():
            out.append(dict(payload))
    return out


def _events_of(events: Any, asset: Any) -> Iterable[Any]:
    if asset is None:
        try:
            from airflow.sdk import Asset
        except ImportError:
            return []
        asset = Asset(RELEASE_ASSET)
    try:
        return list(events[asset])
    except (KeyError, TypeError):
        return []


def _source(message: Any) -> dict[str, Any]:
    try:
        return {"topic": message.topic(), "partition": message.partition(), "offset": message.offset()}
    except Exception:
        return {}


def _release_type() -> str:
    return RELEASE_TYPE
