"""The config resolved once, as seen from the datacenter a process runs in.

A `Topology` holds one `Site` per datacenter. A site knows everything a process needs there, built
lazily on first use and closed with the topology: its object store (internal URL at home, external
from elsewhere), its Kafka (bootstrap for this vantage point, topics, consumer groups by one naming
rule, a shared producer), its state, its cache cluster and the mapping of keys into it. Flows take
a topology or a site (`Mirror(topology)`, `run_prewarm(site, ...)`) instead of a config and a
datacenter name; another datacenter's state is reached only through its site.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaConsumer, KafkaProducer

from cache_client.base import CacheCluster, cluster_from_config
from cache_client.keys import KeyMapper
from xdc.config import Brokers, CacheConfig, Datacenter, KafkaTopics, Route, XdcConfig
from xdc.errors import CacheError, ConfigError
from xdc.io.kafka import make_consumer, make_producer
from xdc.io.s3copy import CopyEngine, EngineSettings
from xdc.io.state import State, open_state, sqlite_path, takes_replicas
from xdc.io.store import S3Store
from xdc.retry import RetryPolicy

Role = Literal["mirror", "resize", "prewarm"]


class Site:
    """One datacenter as seen from the topology's vantage point."""

    def __init__(self, topology: Topology, name: str) -> None:
        self.topology = topology
        self.name = name
        self.config: Datacenter = topology.config.dc(name)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Site({self.name}{', here' if self.local else ''})"

    @property
    def local(self) -> bool:
        return self.name == self.topology.here_name

    # -- object store ------------------------------------------------------------------------
    @property
    def s3_url(self) -> str:
        ep = self.config.s3
        return ep.internal_url if self.local else ep.external_url

    @property
    def s3_ca_bundle(self) -> str | None:
        """The CA bundle every S3 client of this site trusts (absolute), None for the system's."""
        ca = self.config.s3.ca_bundle
        if ca is None:
            return None
        return os.path.normpath(ca if ca.is_absolute() else self.topology.config.base_dir / ca)

    @cached_property
    def store(self) -> S3Store:
        """The site's S3 store (boto3); its copies into another site's store run on the topology's
        async copy engine."""
        ep = self.config.s3
        key, secret = ep.credentials.resolve()
        m = self.topology.config.mirror
        return S3Store(self.s3_url, key, secret, region=ep.region, retry=self.topology.retry,
                       multipart_threshold=m.multipart_threshold_mib * 2**20,
                       multipart_chunk=m.multipart_chunk_mib * 2**20,
                       max_pool=max(32, m.copy_concurrency * 4), ca_bundle=self.s3_ca_bundle,
                       addressing_style=ep.addressing_style, signature_version=ep.signature_version,
                       engine=self.topology.copier)

    # -- Kafka -------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> list[str]:
        k = self.config.kafka
        if self.local or not k.external_bootstrap_servers:
            return list(k.bootstrap_servers)
        return list(k.external_bootstrap_servers)

    @property
    def brokers(self) -> Brokers:
        """This site's Kafka as a client here reaches it: addresses and that listener's security."""
        k = self.config.kafka
        external = not self.local and bool(k.external_bootstrap_servers)
        sec = (k.external_security or k.security) if external else k.security
        return Brokers(tuple(self.bootstrap), sec.absolute(self.topology.config.base_dir))

    @property
    def topics(self) -> KafkaTopics:
        return self.config.kafka.topics

    def group(self, role: Role) -> str:
        """The consumer group of `role` when it runs in this datacenter (one naming rule)."""
        cfg = self.topology.config
        if role == "resize":
            if cfg.resize is None:
                raise ConfigError("no resize: section in the config")
            base = cfg.resize.group_id
        else:
            base = cfg.mirror.group_id if role == "mirror" else cfg.prewarm.group_id
        return f"{base}.{self.name}"

    @cached_property
    def producer(self) -> KafkaProducer:
        """One producer per site and topology, shared by the flows (thread-safe)."""
        return make_producer(self.brokers)

    def consumer(self, group: str | None, topics: list[str] | tuple[str, ...] = (), **overrides: Any) -> KafkaConsumer:
        """A new consumer of this site's broker (the caller closes it)."""
        home = self.topology.here.config.kafka if self.topology.here_name else self.config.kafka
        return make_consumer(self.brokers, group, list(topics), session_timeout_ms=home.session_timeout_ms,
                             heartbeat_interval_ms=home.heartbeat_interval_ms, **overrides)

    # -- state, cache, keys ------------------------------------------------------------------
    @cached_property
    def state(self) -> State:
        pw = None
        if self.config.state_password_env:
            pw = os.environ.get(self.config.state_password_env)
            if pw is None:
                raise ConfigError(f"{self.name}: environment variable {self.config.state_password_env} not set")
        return open_state(self.config.state_url, base_dir=self.topology.config.base_dir, password=pw,
                          durable=self.topology.durable_state)

    @property
    def takes_replicas(self) -> bool:
        """Several mirror / resize processes may share this site's state (known from the URL,
        without connecting)."""
        return takes_replicas(self.config.state_url)

    @property
    def state_location(self) -> str:
        url = self.config.state_url
        return str(sqlite_path(url, self.topology.config.base_dir)) if url.startswith("sqlite:///") else url

    @property
    def has_cache(self) -> bool:
        return self.config.cache is not None

    @cached_property
    def cache(self) -> CacheCluster:
        if self.config.cache is None:
            raise CacheError(f"datacenter {self.name} has no cache cluster configured")
        if not self.config.cache.nodes:
            raise CacheError(f"datacenter {self.name}'s cache is run by Fluid (cache.mode: fluid) and lists no nodes: "
                             "xdc cannot reach it")
        cluster = cluster_from_config(self.cache_config)
        cluster.dc = self.name
        return cluster

    @property
    def cache_config(self) -> CacheConfig:
        """The cache section with the CA its volume's object storage needs made absolute: its own
        `storage_ca_bundle`, else the datacenter's s3.ca_bundle (the volume usually lives there)."""
        cache = self.config.cache
        if cache is None:
            raise CacheError(f"datacenter {self.name} has no cache cluster configured")
        ca = cache.storage_ca_bundle
        ca_path = os.path.normpath(ca if ca.is_absolute() else self.topology.config.base_dir / ca) if ca \
            else self.s3_ca_bundle
        return cache.model_copy(update={"storage_ca_bundle": ca_path and Path(ca_path)})

    @cached_property
    def keys(self) -> KeyMapper:
        """Maps "bucket/key" of any datacenter to where that object lives here."""
        return KeyMapper(self.topology.config, self.name)

    @property
    def bucket_root(self) -> str:
        return self.config.cache.bucket_root if self.config.cache else ""

    # -- routes ------------------------------------------------------------------------------
    @property
    def routes_in(self) -> list[Route]:
        return self.topology.routes_into(self.name)

    @property
    def routes_out(self) -> list[Route]:
        return self.topology.routes_from(self.name)

    def close(self) -> None:
        d = self.__dict__
        if "producer" in d:
            try:
                d.pop("producer").close(timeout=5)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        if "state" in d:
            d.pop("state").close()
        d.pop("store", None)


class Topology:
    """Every datacenter of a config, seen from `here` (the datacenter this process runs in)."""

    def __init__(self, config: XdcConfig, here: str | None = None, *, durable_state: bool = True) -> None:
        """`durable_state=False`: its states' commits are not fsynced one by one (telemetry sinks:
        `xdc.io.state.open_state`)."""
        self.config = config
        self.durable_state = durable_state
        name = here or config.local_dc
        if name is not None:
            config.dc(name)  # ConfigError for an unknown datacenter
        self.here_name = name
        self.retry = RetryPolicy(max_attempts=config.mirror.max_attempts)
        self._sites: dict[str, Site] = {}

    @cached_property
    def copier(self) -> CopyEngine:
        """The one async copy engine of this process's copies (its loop thread starts on first use):
        its concurrency and buffer bound every copy between the sites' stores together."""
        m = self.config.mirror
        return CopyEngine(EngineSettings(concurrency=m.copy_concurrency, buffer_bytes=m.copy_buffer_mib * 2**20,
                                         part_size=m.multipart_chunk_mib * 2**20, retry=self.retry))

    def __repr__(self) -> str:
        return f"Topology(here={self.here_name}, sites={list(self.config.datacenters)})"

    @property
    def here(self) -> Site:
        if not self.here_name:
            raise ConfigError("which datacenter does this process run in? set local_dc, --dc or XDC_DC")
        return self.site(self.here_name)

    def site(self, name: str) -> Site:
        if name not in self._sites:
            self.config.dc(name)
            self._sites[name] = Site(self, name)
        return self._sites[name]

    @property
    def sites(self) -> list[Site]:
        return [self.site(n) for n in self.config.datacenters]

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def seen_from(self, here: str) -> Topology:
        """The same config from another datacenter (a new topology: nothing is shared)."""
        return Topology(self.config, here)

    # -- routes ------------------------------------------------------------------------------
    def routes_into(self, name: str) -> list[Route]:
        return [r for r in self.config.routes if r.target.dc == name]

    def routes_from(self, name: str) -> list[Route]:
        return [r for r in self.config.routes if r.source.dc == name]

    def mirror_targets(self) -> list[Site]:
        """Datacenters some route mirrors into."""
        return [self.site(n) for n in sorted({r.target.dc for r in self.config.routes})]

    def prewarm_sites(self) -> list[Site]:
        names = list(self.config.prewarm.datacenters) or [n for n, d in self.config.datacenters.items() if d.cache]
        return [self.site(n) for n in names]

    def resize_site(self) -> Site:
        if self.config.resize is None:
            raise ConfigError("no resize: section in the config")
        return self.site(self.config.resize.dc) if self.config.resize.dc else self.here

    def close(self) -> None:
        if "copier" in self.__dict__:
            self.__dict__.pop("copier").close()  # cancels copies in flight: their uploads are aborted
        for s in self._sites.values():
            s.close()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def masked_view(topology: Topology) -> dict[str, Any]:
    """The resolved config as plain data, with every secret value masked.

    Credentials show where they come from and whether they resolve, never their value.
    """
    cfg = topology.config
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    for site in topology.sites:
        creds = site.config.s3.credentials
        view: dict[str, Any] = data["datacenters"][site.name]["s3"]["credentials"]
        try:
            key, secret = creds.resolve()
            view["resolved"] = {"access_key": _mask(key), "secret_key": _mask(secret)}
        except Exception as exc:  # noqa: BLE001 - report, do not fail the check
            view["resolved"] = f"NOT RESOLVED: {exc}"
        for which in ("security", "external_security"):
            sec = getattr(site.config.kafka, which)
            if sec is not None and sec.sasl_credentials is not None:
                kview: dict[str, Any] = data["datacenters"][site.name]["kafka"][which]["sasl_credentials"]
                try:
                    user, password = sec.sasl_credentials.resolve()
                    kview["resolved"] = {"username": _mask(user), "password": _mask(password)}
                except Exception as exc:  # noqa: BLE001 - report, do not fail the check
                    kview["resolved"] = f"NOT RESOLVED: {exc}"
        data["datacenters"][site.name]["state_location"] = site.state_location
        data["datacenters"][site.name]["s3"]["url_used_here"] = site.s3_url if topology.here_name else None
    return data


def _mask(value: str) -> str:
    return "****" if value else "(empty)"
