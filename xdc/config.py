"""The one config model: typed, validated at load, shared by the CLI, the DAGs and the Helm values.

A config names datacenters (each with its S3 endpoint, Kafka, state and cache cluster) and routes
(source DC/bucket/prefix -> target DC/bucket/prefix). Secrets are never in the file: credentials are
references (environment variables or an Airflow connection id) resolved at use.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from xdc.errors import ConfigError
from xdc.keys import is_bucket_name


class _Model(BaseModel):
    # Unknown keys are errors: a typo in a config must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Credentials(_Model):
    """A reference to a secret, never the secret: env var names or an Airflow connection id."""

    access_key_env: str | None = None
    secret_key_env: str | None = None
    airflow_conn_id: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Credentials:
        envs = (self.access_key_env, self.secret_key_env)
        if self.airflow_conn_id is None and None in envs:
            raise ValueError("credentials need access_key_env and secret_key_env, or airflow_conn_id")
        if self.airflow_conn_id is not None and any(envs):
            raise ValueError("credentials: give env var names or airflow_conn_id, not both")
        return self

    def resolve(self) -> tuple[str, str]:
        """Return (access key, secret key), read from the environment or the Airflow connection."""
        if self.airflow_conn_id:
            return _airflow_login(self.airflow_conn_id)
        assert self.access_key_env and self.secret_key_env
        missing = [n for n in (self.access_key_env, self.secret_key_env) if n not in os.environ]
        if missing:
            raise ConfigError(f"credentials: environment variable(s) not set: {', '.join(missing)}")
        return os.environ[self.access_key_env], os.environ[self.secret_key_env]


def _airflow_login(conn_id: str) -> tuple[str, str]:
    try:
        from airflow.sdk import BaseHook  # only where Airflow runs
    except ImportError as exc:  # pragma: no cover - depends on install
        raise ConfigError(f"airflow_conn_id {conn_id!r} needs Airflow installed") from exc
    conn = BaseHook.get_connection(conn_id)
    return conn.login or "", conn.password or ""


class S3Endpoint(_Model):
    """A datacenter's S3 endpoint, as every S3 client of the project reaches it (the sync store, the
    async copy engine, and the cache nodes' JuiceFS mounts where their volume lives on it)."""

    internal_url: str  # used by processes running in this datacenter
    external_url: str  # used from the other datacenter
    region: str = "us-east-1"
    credentials: Credentials
    # The store publishes an S3 event notification for every write on this datacenter's events
    # topic (AWS, MinIO, Ceph with notifications configured): the project's writers then announce
    # nothing themselves. False: ingest and the resize worker announce their writes.
    notifications: bool = False
    # PEM file of the CA(s) that signed an https endpoint's certificate (a company's private CA);
    # relative to the config file. Default: the system's CA certificates.
    ca_bundle: Path | None = None
    addressing_style: Literal["path", "virtual", "auto"] = "path"  # virtual: https://bucket.host/key
    signature_version: Literal["s3v4", "s3"] = "s3v4"  # "s3": legacy SigV2, for old gateways only

    @field_validator("internal_url", "external_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v.rstrip("/")


class KafkaTopics(_Model):
    events: str = "xdc.events"  # S3 event notifications of this DC's buckets
    applied: str = "xdc.applied"  # objects the mirror applied into this DC
    releases: str = "xdc.releases"  # dataset releases
    dead_letter: str = "xdc.dlq"


class SaslCredentials(_Model):
    """A reference to a SASL user and password: env var names or an Airflow connection id."""

    username_env: str | None = None
    password_env: str | None = None
    airflow_conn_id: str | None = None  # its login / password

    @model_validator(mode="after")
    def _one_kind(self) -> SaslCredentials:
        envs = (self.username_env, self.password_env)
        if self.airflow_conn_id is None and None in envs:
            raise ValueError("sasl credentials need username_env and password_env, or airflow_conn_id")
        if self.airflow_conn_id is not None and any(envs):
            raise ValueError("sasl credentials: give env var names or airflow_conn_id, not both")
        return self

    def resolve(self) -> tuple[str, str]:
        """Return (username, password), read from the environment or the Airflow connection."""
        if self.airflow_conn_id:
            return _airflow_login(self.airflow_conn_id)
        assert self.username_env and self.password_env
        missing = [n for n in (self.username_env, self.password_env) if n not in os.environ]
        if missing:
            raise ConfigError(f"kafka sasl credentials: environment variable(s) not set: {', '.join(missing)}")
        return os.environ[self.username_env], os.environ[self.password_env]


class KafkaSecurity(_Model):
    """How clients authenticate to a broker and trust it (applied to every Kafka client).

    Files are PEM; relative paths are relative to the config file. Secrets are references.
    """

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_credentials: SaslCredentials | None = None
    ca_file: Path | None = None  # CA bundle that signed the brokers' certificates (default: system's)
    cert_file: Path | None = None  # client certificate chain, for brokers that require mTLS
    key_file: Path | None = None  # its private key
    key_password_env: str | None = None  # env var holding the key's password, if it is encrypted
    check_hostname: bool = True  # the broker certificate must name the host we connect to

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        sasl = self.protocol.startswith("SASL_")
        tls = self.protocol.endswith("SSL")
        if sasl and (self.sasl_mechanism is None or self.sasl_credentials is None):
            raise ValueError(f"security.protocol {self.protocol} needs sasl_mechanism and sasl_credentials")
        if not sasl and (self.sasl_mechanism or self.sasl_credentials):
            raise ValueError(f"security.protocol {self.protocol} has no SASL: drop sasl_mechanism/sasl_credentials")
        if not tls and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError(f"security.protocol {self.protocol} has no TLS: drop ca_file/cert_file/key_file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("security: cert_file and key_file go together (mTLS)")
        return self

    def absolute(self, base_dir: Path) -> KafkaSecurity:
        """The same settings with file paths made absolute against the config file's directory."""
        files = {k: (v if v.is_absolute() else base_dir / v) for k in ("ca_file", "cert_file", "key_file")
                 if (v := getattr(self, k)) is not None}
        return self.model_copy(update=files) if files else self


class KafkaConfig(_Model):
    bootstrap_servers: list[str] = Field(min_length=1)  # internal listeners
    external_bootstrap_servers: list[str] | None = None  # from the other DC; default: internal
    security: KafkaSecurity = KafkaSecurity()
    external_security: KafkaSecurity | None = None  # of the external listeners; default: security
    topics: KafkaTopics = KafkaTopics()
    partitions: int = Field(4, ge=1)
    # Airflow `kafka` connection used by the DAGs' message-queue trigger.
    airflow_conn_id: str | None = None
    # A group join takes about half the session timeout on the local broker: keep it short.
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)


@dataclass(frozen=True)
class Brokers:
    """One Kafka cluster as a client sees it: bootstrap addresses and how to connect securely."""

    servers: tuple[str, ...]
    security: KafkaSecurity = KafkaSecurity()

    def __str__(self) -> str:
        return ",".join(self.servers)


class CacheNode(_Model):
    name: str
    mount: Path | None = None  # juicefs: where the volume is mounted on this node
    cache_dir: Path | None = None  # juicefs: the node's cache directory
    cache_size_mib: int = Field(1024, ge=1)  # juicefs: the node's cache size (Alluxio reports its own)
    metrics: str | None = None  # host:port of the node's Prometheus endpoint
    worker: str | None = None  # alluxio: host:rpc_port of the node's Alluxio worker
    # shares of the cache size; default: the cluster's (see CacheConfig)
    high_watermark: float | None = Field(None, gt=0, le=1)
    low_watermark: float | None = Field(None, gt=0, le=1)


class AlluxioSettings(_Model):
    """Where an Alluxio cluster's REST interfaces are (host:port of each web port)."""

    master: str  # the master's web port: workers' capacity and usage
    job_master: str  # the job master's web port: load jobs
    proxy: str  # the proxy's web port (with alluxio.proxy.s3.v2.version.enabled=false): status, free
    active_jobs: int = Field(8, ge=1)  # load jobs in flight at once
    batch_files: int = Field(32, ge=1)  # most files per batched load job
    job_timeout_seconds: float = Field(1800.0, gt=0)
    free_timeout_seconds: float = Field(120.0, gt=0)  # freed blocks leave the workers on their heartbeats


_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class FluidSettings(_Model):
    """How this datacenter's cache is driven when Fluid runs it (`xdc prewarm export --format fluid`,
    and the prewarm DAG with `cache.mode: fluid`): DataLoads against one Fluid Dataset."""

    dataset: str  # the Fluid Dataset (metadata.name) whose mounts serve this datacenter's buckets
    namespace: str = "default"
    # where the volume's /<bucket_root>/<bucket>/<key> appears in the Dataset's namespace
    # ("/": one mount per bucket, named after it, as Fluid mounts them at /<name>)
    path_root: str = "/"
    load_metadata: bool = True  # sync the Dataset's metadata first (set on the first DataLoad only)
    policy: Literal["Once", "Cron", "OnEvent"] = "Once"
    schedule: str | None = None  # a cron expression: with policy Cron
    replicas: int | None = Field(None, ge=1)  # spec.target[].replicas: copies of each file in the cache
    chunk_files: int = Field(5000, ge=1)  # most paths per DataLoad (a Kubernetes object stays small)
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    output: str | None = None  # the DAG writes the manifests here: a directory, or s3://bucket/prefix

    @model_validator(mode="after")
    def _policy(self) -> FluidSettings:
        if (self.policy == "Cron") != bool(self.schedule):
            raise ValueError("cache.fluid: policy Cron needs schedule (a cron expression), and only Cron takes one")
        if not self.path_root.startswith("/"):
            raise ValueError("cache.fluid.path_root: an absolute path in the Dataset, e.g. /")
        for what, v, limit in (("dataset", self.dataset, 253), ("namespace", self.namespace, 63)):
            if len(v) > limit or not _K8S_NAME.fullmatch(v):
                raise ValueError(f"cache.fluid.{what}: {v!r} is not a Kubernetes name (lower-case a-z, 0-9, '-')")
        return self


class CacheConfig(_Model):
    backend: Literal["juicefs", "alluxio"] = "juicefs"
    # warm: xdc loads the cache itself (plan, warm, check); fluid: the prewarm DAG writes Fluid
    # DataLoad manifests (cache.fluid) and Fluid's controller loads them
    mode: Literal["warm", "fluid"] = "warm"
    fluid: FluidSettings | None = None
    # replicate: every node warms the whole list (JuiceFS CE, readers on each node);
    # shard: consistent hashing over the nodes (cache-group-style clusters).
    placement: Literal["replicate", "shard"] = "replicate"
    virtual_nodes: int = Field(64, ge=1)
    meta_url: str | None = None  # juicefs: the volume's metadata engine URL
    alluxio: AlluxioSettings | None = None  # alluxio: the cluster's REST endpoints
    # the cache nodes xdc warms, checks and frees (with mode fluid, optional: Fluid runs them)
    nodes: list[CacheNode] = Field(default_factory=list)
    threads_per_node: int = Field(8, ge=1)
    # Where a bucket's keys live inside the mount: <mount>/<bucket_root>/<bucket>/<key>
    # (alluxio: inside the namespace, /<bucket_root>/<bucket>/<key>)
    bucket_root: str = ""
    # Watermarks, shares of each node's cache size (a node may set its own): a warm may fill a node
    # up to `high_watermark`; one that would pass it names the retired datasets whose files bring
    # the node under `low_watermark` (default: the high one), and frees them when asked (make room).
    high_watermark: float = Field(1.0, gt=0, le=1)
    low_watermark: float | None = Field(None, gt=0, le=1)
    # CA of the volume's object storage, for mounts made by the project (juicefs gets it as
    # SSL_CERT_FILE); default: the datacenter's s3.ca_bundle (the volume usually lives there)
    storage_ca_bundle: Path | None = None

    def watermarks(self, node: str) -> tuple[float, float]:
        """(high, low) of a node: its own, else the cluster's; low defaults to high."""
        n = next((x for x in self.nodes if x.name == node), None)
        high = n.high_watermark if n is not None and n.high_watermark is not None else self.high_watermark
        low = n.low_watermark if n is not None and n.low_watermark is not None else self.low_watermark
        return high, min(high, low) if low is not None else high

    @model_validator(mode="after")
    def _watermarks(self) -> CacheConfig:
        for n in self.nodes:
            high = n.high_watermark if n.high_watermark is not None else self.high_watermark
            low = n.low_watermark if n.low_watermark is not None else self.low_watermark
            if low is not None and low > high:
                raise ValueError(f"cache node {n.name}: low_watermark {low} is above high_watermark {high}")
        return self

    @model_validator(mode="after")
    def _backend_fields(self) -> CacheConfig:
        if self.mode == "fluid" and (self.fluid is None or not self.fluid.output):
            raise ValueError("cache: mode fluid needs fluid: {dataset, output, ...} (where the DataLoads are written)")
        if not self.nodes:
            if self.mode == "warm":
                raise ValueError("cache: nodes: at least one (only a cache run by Fluid, mode fluid, may list none)")
            return self
        if self.backend == "juicefs":
            if not self.meta_url:
                raise ValueError("cache: backend juicefs needs meta_url")
            bad = [n.name for n in self.nodes if n.mount is None or n.cache_dir is None]
            if bad:
                raise ValueError(f"cache: backend juicefs needs mount and cache_dir on every node (missing on {bad})")
        elif self.backend == "alluxio":
            if self.alluxio is None:
                raise ValueError("cache: backend alluxio needs alluxio: {master, job_master, proxy}")
            bad = [n.name for n in self.nodes if not n.worker]
            if bad:
                raise ValueError(f"cache: backend alluxio needs worker (host:rpc_port) on every node (missing on {bad})")
            workers = [n.worker for n in self.nodes]
            if len(set(workers)) != len(workers):
                raise ValueError("cache: two nodes name the same Alluxio worker")
        return self


class Datacenter(_Model):
    s3: S3Endpoint
    kafka: KafkaConfig
    # sqlite:///PATH (relative to the config file) or postgresql://user@host:port/db
    state_url: str = Field("sqlite:///state.db", validation_alias=AliasChoices("state_url", "catalog_url"))
    state_password_env: str | None = None  # env var holding the PostgreSQL password (never the password)
    cache: CacheConfig | None = None
    buckets: list[str] = []  # buckets of this DC that no route names

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("state_url: sqlite:///PATH or postgresql://user@host:port/database")
        return v


class Location(_Model):
    dc: str
    bucket: str
    prefix: str = ""

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not is_bucket_name(v):
            raise ValueError(f"not a valid S3 bucket name: {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"prefix must be relative with no '..': {v!r}")
        return v

    def covers(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and key.startswith(self.prefix)


class TwoWay(_Model):
    """How a route that has a mirror image (B->A over the same data as A->B) settles concurrent
    writes of one key in both datacenters (README "Guarantees", two-way routes)."""

    # the newer version by the store's Last-Modified wins, ties to the datacenter whose name sorts
    # last; the other version is kept beside the key and reported as a conflict
    conflict: Literal["last_writer_wins"]


class Route(_Model):
    name: str = ""
    source: Location
    target: Location
    mode: Literal["metadata", "data"] = "metadata"
    two_way: TwoWay | None = None  # required when a route in the other direction covers the same data

    @model_validator(mode="after")
    def _name(self) -> Route:
        if not self.name:
            object.__setattr__(self, "name", f"{self.source.dc}:{self.source.bucket}->{self.target.dc}:{self.target.bucket}")
        if self.source.dc == self.target.dc:
            raise ValueError(f"route {self.name}: source and target are the same datacenter")
        return self

    def target_key(self, source_key: str) -> str:
        return self.target.prefix + source_key[len(self.source.prefix):]

    def mirrors(self, other: Route) -> bool:
        """`other` runs the other way over data this route also covers (a two-way pair): its
        target is this route's source datacenter and bucket, with overlapping prefixes."""
        return (other.source.dc == self.target.dc and other.target.dc == self.source.dc
                and other.source.bucket == self.target.bucket and other.target.bucket == self.source.bucket
                and _overlap(other.target.prefix, self.source.prefix)
                and _overlap(other.source.prefix, self.target.prefix))


def _overlap(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


class MirrorSettings(_Model):
    group_id: str = "xdc-mirror"
    batch_max_records: int = Field(2000, ge=1)
    batch_max_seconds: float = Field(1.0, gt=0)
    copy_concurrency: int = Field(16, ge=1)
    multipart_threshold_mib: int = Field(16, ge=5)
    multipart_chunk_mib: int = Field(8, ge=5)  # part size of a copy whose source layout is unknown
    copy_buffer_mib: int = Field(256, ge=8)  # part buffers of the copy engine in memory at once
    upload_sweep_minutes: float = Field(10.0, gt=0)  # how often abandoned multipart uploads are swept
    abandoned_upload_minutes: float = Field(60.0, ge=0)  # an upload this old under a target prefix is abandoned
    max_attempts: int = Field(5, ge=1)  # per S3 call, with capped exponential backoff and jitter
    max_key_bytes: int = Field(1024, ge=1)  # S3's own limit
    max_message_bytes: int = Field(1_048_576, ge=1024)


class ResizeSettings(_Model):
    dc: str | None = None  # where frames land; default: local_dc
    bucket: str
    prefixes: list[str] = ["raw/"]  # keys under these are frames to resize
    derived_prefix: str = "720p/"  # derivative of raw/x.jpg is 720p/x.jpg
    width: int = Field(1280, ge=16)
    height: int = Field(720, ge=16)
    quality: int = Field(90, ge=1, le=100)
    subsampling: Literal["4:2:0", "4:2:2", "4:4:4"] = "4:2:0"
    png_output: Literal["png", "jpeg"] = "jpeg"
    small_input: Literal["skip", "copy"] = "skip"
    max_pixels: int = Field(80_000_000, ge=1)  # decompression-bomb guard (4K is 8.3 MP)
    max_input_mib: int = Field(64, ge=1)
    workers: int = Field(0, ge=0)  # 0: one per core
    group_id: str = "xdc-resize"


class PrewarmSettings(_Model):
    datacenters: list[str] = []  # where a release is prewarmed; default: every DC with a cache
    ready_timeout_seconds: float = Field(600, ge=0)
    ready_poll_seconds: float = Field(2.0, gt=0)
    max_rewarm_rounds: int = Field(2, ge=0)
    prefer_derived: bool = False  # warm the 720p derivative of a frame where it exists
    default_bandwidth_mib_s: float = Field(100.0, gt=0)  # ETA before any run was measured
    group_id: str = "xdc-prewarm"
    # a released dataset that cannot be warmed yet is tried this often, with capped backoff from
    # release_retry_seconds, before it goes to the dead-letter topic
    release_attempts: int = Field(5, ge=1)
    release_retry_seconds: float = Field(2.0, gt=0)
    # the reconciler leaves a release alone this long after it was published or last tried: the
    # follower or the DAG may still be on it
    reconcile_after_seconds: float = Field(600.0, ge=0)


class LagSettings(_Model):
    objective_p99_seconds: float = Field(60.0, gt=0)
    window_seconds: float = Field(300.0, gt=0)  # events considered by one lag snapshot
    retention_hours: float = Field(24.0, gt=0)


class MetricsSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0)  # 0: no /metrics endpoint
    # env var holding the token every path but /healthz and /readyz then needs (Bearer, or Basic
    # with it as the password); required on any host but loopback. Also the dashboard's default.
    token_env: str | None = None

    @model_validator(mode="after")
    def _guarded(self) -> MetricsSettings:
        loopback = self.host == "localhost" or self.host.startswith("127.") or self.host == "::1"
        if self.port and not loopback and not self.token_env:
            raise ValueError(f"host {self.host} is reachable from other machines: set token_env "
                             "(the env var holding a token the scrape and the dashboard must send) or bind 127.0.0.1")
        return self

    def token(self) -> str | None:
        """The token, read from `token_env` (ConfigError when that variable is not set)."""
        if not self.token_env:
            return None
        value = os.environ.get(self.token_env)
        if not value:
            raise ConfigError(f"metrics.token_env: environment variable {self.token_env} is not set")
        return value


class TracingSettings(_Model):
    """Spans along each object's path (xdc.trace); sampling keeps the cost small.

    A trace starts where an object enters (ingest, scan, an S3 event that carries none) with
    probability `sample_ratio`; every later step follows the first one's decision, across Kafka in
    the W3C traceparent header. Releases and prewarm runs are always traced (they are few).
    """

    enabled: bool = True
    sample_ratio: float = Field(0.01, ge=0.0, le=1.0)
    # state: the built-in sink, recent spans in each datacenter's state (`xdc trace`, dashboard);
    # otlp: OTLP over HTTP to any collector (otlp_endpoint, e.g. http://otel-collector:4318)
    exporters: list[Literal["state", "otlp"]] = ["state"]
    otlp_endpoint: str | None = None
    export_interval_ms: int = Field(1000, ge=10)
    retention_hours: float = Field(24.0, gt=0)
    max_spans: int = Field(200_000, ge=100)  # kept per datacenter by the built-in sink
    # files of a traced object warmed one by one (timed) per cache-node job; the rest in one batch
    traced_files_per_node: int = Field(8, ge=0)

    @model_validator(mode="after")
    def _otlp(self) -> TracingSettings:
        if "otlp" in self.exporters and not self.otlp_endpoint:
            raise ValueError("tracing.exporters has otlp: set tracing.otlp_endpoint (http(s)://host:4318)")
        if self.otlp_endpoint and not re.match(r"^https?://[^/\s]+", self.otlp_endpoint):
            raise ValueError(f"tracing.otlp_endpoint is not an http(s) URL: {self.otlp_endpoint!r}")
        return self


class XdcConfig(_Model):
    version: Literal[1] = 1
    local_dc: str | None = None  # which datacenter this process runs in (also --dc / XDC_DC)
    datacenters: dict[str, Datacenter] = Field(min_length=1)
    routes: list[Route] = []
    mirror: MirrorSettings = MirrorSettings()
    resize: ResizeSettings | None = None
    prewarm: PrewarmSettings = PrewarmSettings()
    lag: LagSettings = LagSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    run_dir: Path | None = None  # where the local stack keeps logs and pids
    base_dir: Path = Path(".")  # directory of the config file; set by the loader

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> XdcConfig:
        dcs = set(self.datacenters)
        if self.local_dc is not None and self.local_dc not in dcs:
            raise ValueError(f"local_dc {self.local_dc!r} is not one of the datacenters {sorted(dcs)}")
        for r in self.routes:
            for end in (r.source, r.target):
                if end.dc not in dcs:
                    raise ValueError(f"route {r.name}: unknown datacenter {end.dc!r} (known: {sorted(dcs)})")
        if len({r.name for r in self.routes}) != len(self.routes):
            raise ValueError("route names must be unique")
        for r in self.routes:
            other = next((o for o in self.routes if r.mirrors(o)), None)
            if other is not None and r.two_way is None:
                raise ValueError(
                    f"routes {r.name} and {other.name} mirror the same data both ways: give both "
                    "`two_way: {conflict: last_writer_wins}` (how concurrent writes of one key in both "
                    "datacenters are settled; see README, Guarantees)")
        for dc in self.prewarm.datacenters:
            if dc not in dcs:
                raise ValueError(f"prewarm.datacenters: unknown datacenter {dc!r}")
        if self.resize and self.resize.dc and self.resize.dc not in dcs:
            raise ValueError(f"resize.dc: unknown datacenter {self.resize.dc!r}")
        collisions = bucket_collisions(self)
        # `xdc config impact` reads a proposed config that may have them, to report them
        if collisions and not (info.context or {}).get("allow_bucket_collisions"):
            raise ValueError(collisions[0])
        return self

    def dc(self, name: str) -> Datacenter:
        """A datacenter's section; ConfigError naming the known ones when there is none."""
        try:
            return self.datacenters[name]
        except KeyError:
            raise ConfigError(f"unknown datacenter {name!r} (known: {sorted(self.datacenters)})") from None


def bucket_collisions(cfg: XdcConfig) -> list[str]:
    """S3 bucket names are global per partition: the same name in two DCs must be the same data.

    A name in two datacenters is accepted only when a route mirrors one into the other under the
    same prefix mapping; otherwise it is a collision (the loader refuses it), named with both
    datacenters.
    """
    out: list[str] = []
    owners: dict[str, set[str]] = {}
    for name, d in cfg.datacenters.items():
        for b in d.buckets:
            owners.setdefault(b, set()).add(name)
    for r in cfg.routes:
        owners.setdefault(r.source.bucket, set()).add(r.source.dc)
        owners.setdefault(r.target.bucket, set()).add(r.target.dc)
    mirrored = {
        (r.source.bucket, frozenset((r.source.dc, r.target.dc)))
        for r in cfg.routes
        if r.source.bucket == r.target.bucket and r.source.prefix == r.target.prefix
    }
    for bucket, dcs in sorted(owners.items()):
        if len(dcs) < 2:
            continue
        for a in sorted(dcs):
            for b in sorted(dcs):
                if a < b and (bucket, frozenset((a, b))) not in mirrored:
                    out.append(
                        f"bucket {bucket!r} is used in datacenters {a} and {b} for different data "
                        f"(no route mirrors {a}:{bucket} to {b}:{bucket} with the same prefix); "
                        "bucket names are global per S3 partition: rename one of them"
                    )
    return out


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None, dc: str | None = None,
                 allow_bucket_collisions: bool = False) -> XdcConfig:
    """Validate a config mapping (from a file, a Helm ConfigMap or a DAG param).

    `allow_bucket_collisions`: load a config that has them (only to report them: `xdc config impact`)."""
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping")
    data = dict(data)
    if base_dir is not None:
        data["base_dir"] = base_dir
    dc = dc or os.environ.get("XDC_DC") or None
    if dc:
        data["local_dc"] = dc
    try:
        return XdcConfig.model_validate(data, context={"allow_bucket_collisions": allow_bucket_collisions})
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def load_config(path: str | os.PathLike[str], *, dc: str | None = None,
                allow_bucket_collisions: bool = False) -> XdcConfig:
    """Load a YAML config file (JSON is YAML too). `dc` overrides local_dc, as does XDC_DC."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    try:
        return parse_config(raw or {}, base_dir=p.resolve().parent, dc=dc,
                            allow_bucket_collisions=allow_bucket_collisions)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def config_path_from_env(explicit: str | None = None) -> str:
    path = explicit or os.environ.get("XDC_CONFIG")
    if not path:
        raise ConfigError("no config file: pass --config FILE or set XDC_CONFIG")
    return path


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)
