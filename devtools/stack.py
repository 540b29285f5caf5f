"""The local stack: two datacenters of real servers on 127.0.0.1, for the demo and the tests.

Per datacenter: an Apache Kafka broker (KRaft, one node, log on disk: devtools/kafka_broker.py),
an S3 endpoint (a JuiceFS gateway over a JuiceFS volume: file storage + SQLite metadata) behind a
notifying proxy that announces every write on the datacenter's events topic, as AWS, MinIO and Ceph
do (devtools/notifying_proxy.py; the config says `s3.notifications: true`), its state
(a SQLite file, or with `state="postgres"` a database on one PostgreSQL server for the stack), and
a cache cluster of N nodes: with `cache="juicefs"` FUSE mounts of the same volume, each with its
own cache dir; with `cache="alluxio"` an Alluxio 2.9 cluster (devtools/alluxio.py: master, job
master, proxy, N workers with their job workers) whose root under-storage and mounted buckets are
the datacenter's S3 endpoint. `up` writes `xdc.yaml` and `secrets.env` into the run directory and
records every process it started in `stack.json` (and each Alluxio cluster's ports and
directories); `down` stops exactly those (pid and start time must still match) and unmounts its
mounts. A datacenter's broker can listen with TLS + SASL (`up(kafka_security={...})`).

WAN mode (`up(wan_rate="200mbit")`, root only): each datacenter's S3 gateway, notifying proxy and
broker run in a network namespace of their own, joined to the other's by one rate-limited link
(devtools/netns.py); the config names each datacenter's internal address (its own processes, and
this machine's root namespace) and its external one (the other datacenter, across the link).
`wan(run)` gives the link to cut and restore and `wan(run).exec_prefix(dc)` the command prefix that
runs a process inside a datacenter; `down` removes the namespaces. State stays SQLite (a file per
datacenter) and caches JuiceFS in this mode.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cache_client import juicefs
from cache_client.juicefs import juicefs_bin, mount_node
from devtools import alluxio, kafka_broker, postgres
from devtools.kafka_broker import Addresses, SecureListener
from devtools.netns import Wan
from devtools.procs import (
    Proc,
    StackError,
    alive,
    free_port,
    http_ok,
    kill_proc,
    rss_mib,
    spawn,
    stop_proc,
    tcp_ready,
    wait_ready,
)
from xdc.app.env import load_env_file
from xdc.config import XdcConfig, load_config, parse_config
from xdc.io.kafka import ensure_topics
from xdc.io.store import S3Store
from xdc.topology import Topology

log = logging.getLogger(__name__)

DEFAULT_DCS = ("A", "B")
CACHES = ("juicefs", "alluxio")
STATE_FILE = "stack.json"
CONFIG_FILE = "xdc.yaml"
SECRETS_FILE = "secrets.env"


@dataclass
class StackState:
    run_dir: str
    procs: list[Proc] = field(default_factory=list)
    mounts: list[dict[str, str]] = field(default_factory=list)  # dc, node, mount
    alluxio: dict[str, dict[str, Any]] = field(default_factory=dict)  # dc -> LocalAlluxio (without procs)
    wan: str | None = None  # the WAN mode's namespaces (netns.Wan as JSON), removed by `down`

    def save(self) -> None:
        Path(self.run_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> StackState | None:
        p = run_dir / STATE_FILE
        if not p.exists():
            return None
        d = json.loads(p.read_text())
        return cls(d["run_dir"], [Proc(**x) for x in d["procs"]], d.get("mounts", []), d.get("alluxio", {}),
                   d.get("wan"))


# -- servers ----------------------------------------------------------------------------------
def start_broker(run_dir: Path, dc: str, *, secure: SecureListener | None = None,
                 users: dict[str, str] | None = None, timeout: float = 90.0, wan: Wan | None = None) -> Proc:
    """An Apache Kafka node for `dc` in run_dir/<dc>/kafka, on free ports; ready when it logged
    that it started and its port answers. A directory formatted before keeps its data, ports and
    settings (`secure`/`users` then do not change anything). With `wan`: inside the datacenter's
    namespace, on its internal and external addresses."""
    bdir = run_dir / dc / "kafka"
    addresses = Addresses(wan.internal(dc), wan.external(dc)) if wan else None
    port, controller = (addresses.port, addresses.controller_port) if addresses else \
        kafka_broker.ports(bdir) or (free_port(), free_port())
    t0 = time.monotonic()
    kafka_broker.prepare(bdir, port, controller, secure=secure, users=users, addresses=addresses)
    p = _start_kafka(f"broker-{dc}", (wan.exec_prefix(dc) if wan else []) + kafka_broker.command(bdir),
                     run_dir / "logs" / f"broker-{dc}.log", port, timeout,
                     host=addresses.internal if addresses else "127.0.0.1")
    p.ready_s = round(time.monotonic() - t0, 2)
    log.info("broker %s ready in %.1fs (port %d, RSS %.0f MiB)", dc, p.ready_s, port, rss_mib(p.pid))
    return p


def _start_kafka(name: str, cmd: list[str], log_path: Path, port: int, timeout: float,
                 host: str = "127.0.0.1") -> Proc:
    offset = log_path.stat().st_size if log_path.exists() else 0
    t0 = time.monotonic()
    p = spawn(name, cmd, log_path, port=port)
    try:
        wait_ready(lambda: kafka_broker.started_since(log_path, offset) and tcp_ready(port, host), f"Kafka {name}", p,
                   timeout)
    except BaseException:
        stop_proc(p)
        raise
    p.ready_s = round(time.monotonic() - t0, 2)
    return p


def format_volume(dc_dir: Path, name: str) -> str:
    """A JuiceFS volume on file storage with SQLite metadata (idempotent). Returns the meta URL."""
    meta = f"sqlite3://{dc_dir / 'meta.db'}"
    dc_dir.mkdir(parents=True, exist_ok=True)
    juicefs.format_volume(meta, dc_dir / "data", name)
    return meta


WAN_S3_PORT = 9000  # inside a datacenter's namespace every port is free
WAN_NOTIFY_PORT = 9001


def start_gateway(run_dir: Path, dc: str, meta: str, access_key: str, secret_key: str, *,
                  port: int | None = None, wan: Wan | None = None) -> Proc:
    """The datacenter's S3 endpoint; with `wan`, inside its namespace on every address it has there
    (internal and external)."""
    port = port or (WAN_S3_PORT if wan else free_port())
    dc_dir = run_dir / dc
    env = {"MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key}
    bind, reach = (f"0.0.0.0:{port}", wan.internal(dc)) if wan else (f"127.0.0.1:{port}", "127.0.0.1")
    metrics = f"127.0.0.1:{9567 if wan else free_port()}"
    p = spawn(f"s3-{dc}", (wan.exec_prefix(dc) if wan else []) + [
        juicefs_bin(), "gateway", "--no-agent", "--no-usage-report", "--multi-buckets", "--keep-etag",
        "--object-meta", "--cache-dir", str(dc_dir / "gateway-cache"), "--cache-size", "256", "--metrics", metrics,
        meta, bind], run_dir / "logs" / f"s3-{dc}.log", env, port)
    wait_ready(lambda: http_ok(f"http://{reach}:{port}/minio/health/live"), f"S3 gateway {dc}", p)
    return p


# -- the stack --------------------------------------------------------------------------------
def start_notifying_proxy(run_dir: Path, dc: str, gateway_port: int, port: int, *, wan: Wan | None = None) -> Proc:
    """The datacenter's S3 endpoint as clients see it: the proxy that announces each write (its
    config, brokers and credentials from the run directory's xdc.yaml and secrets.env). With `wan`,
    inside the datacenter's namespace on all its addresses there (internal and external)."""
    host = "0.0.0.0" if wan else "127.0.0.1"  # all addresses of a namespace of the stack's own
    p = spawn(f"notify-{dc}", (wan.exec_prefix(dc) if wan else []) + [
        sys.executable, "-m", "devtools.notifying_proxy", "--config", str(run_dir / CONFIG_FILE),
        "--dc", dc, "--upstream", f"http://127.0.0.1:{gateway_port}", "--host", host, "--port", str(port),
        "--meta", str(run_dir / dc / "notify-meta.db"), "--env-file", str(run_dir / SECRETS_FILE)],
        run_dir / "logs" / f"notify-{dc}.log", port=port)
    wait_ready(lambda: tcp_ready(port, wan.internal(dc) if wan else "127.0.0.1"), f"notifying proxy {dc}", p)
    return p


def gateway_url(run_dir: str | Path, dc: str) -> str:
    """The JuiceFS gateway of `dc` itself, behind its notifying proxy: writes through it announce
    nothing (tests use it for a lost notification, or an out-of-band change)."""
    state = StackState.load(Path(run_dir))
    gw = next((p for p in state.procs if p.name == f"s3-{dc}"), None) if state else None
    if state is None or gw is None or not gw.port:
        raise StackError(f"no S3 gateway of {dc} in {run_dir}")
    host = Wan.from_json(state.wan).internal(dc) if state.wan else "127.0.0.1"
    return f"http://{host}:{gw.port}"


def stack_config(run_dir: Path, ports: dict[str, dict[str, int]], metas: dict[str, str], *,
                 nodes: int, cache_size_mib: int, dcs: tuple[str, ...] = DEFAULT_DCS,
                 kafka_security: dict[str, SecureListener] | None = None,
                 state_urls: dict[str, str] | None = None,
                 caches: dict[str, dict[str, Any]] | None = None, wan: Wan | None = None) -> dict[str, Any]:
    """The config the stack writes: one datacenter per name, routes A -> B. `caches`: a
    datacenter's `cache:` block when it is not the JuiceFS mounts (an Alluxio cluster's). With
    `wan`, each datacenter's internal and external addresses are its namespace's (netns.Wan)."""
    datacenters: dict[str, Any] = {}
    for dc in dcs:
        d = dc.lower()
        inside, outside = (wan.internal(dc), wan.external(dc)) if wan else ("127.0.0.1", "127.0.0.1")
        dc_dir = run_dir / dc
        datacenters[dc] = {
            "s3": {"internal_url": f"http://{inside}:{ports[dc]['notify']}",
                   "external_url": f"http://{outside}:{ports[dc]['notify']}", "notifications": True,
                   "credentials": {"access_key_env": f"XDC_{dc}_ACCESS_KEY", "secret_key_env": f"XDC_{dc}_SECRET_KEY"}},
            "kafka": {"bootstrap_servers": [f"{inside}:{ports[dc]['kafka']}"], "partitions": 4},
            "state_url": (state_urls or {}).get(dc, f"sqlite:///{dc}/state.db"),
            "buckets": [f"idc{d}-datasets"],
            "cache": {
                "meta_url": metas[dc], "placement": "replicate",
                "nodes": [{"name": f"{d}{i}", "mount": str(dc_dir / f"mnt{i}"), "cache_dir": str(dc_dir / f"cache{i}"),
                           "cache_size_mib": cache_size_mib} for i in range(nodes)],
            } if nodes else None,
        }
        if caches and dc in caches:
            datacenters[dc]["cache"] = caches[dc]
        elif not nodes:
            del datacenters[dc]["cache"]
        if wan:
            ext = Addresses(inside, outside).external_port
            datacenters[dc]["kafka"]["external_bootstrap_servers"] = [f"{outside}:{ext}"]
        if kafka_security and dc in kafka_security:
            datacenters[dc]["kafka"]["security"] = client_security(dc, kafka_security[dc])
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


def client_security(dc: str, sec: SecureListener) -> dict[str, Any]:
    """The config's kafka.security for a datacenter whose broker listens with `sec`: the stack's
    SASL user by reference (XDC_<DC>_KAFKA_USER / _PASSWORD in secrets.env)."""
    out: dict[str, Any] = {"protocol": sec.protocol, "ca_file": str(sec.ca_file)}
    if sec.sasl_mechanism:
        out["sasl_mechanism"] = sec.sasl_mechanism
        out["sasl_credentials"] = {"username_env": f"XDC_{dc}_KAFKA_USER", "password_env": f"XDC_{dc}_KAFKA_PASSWORD"}
    if sec.client_cert_file and sec.client_key_file:
        out["cert_file"], out["key_file"] = str(sec.client_cert_file), str(sec.client_key_file)
    return out


def up(run_dir: str | Path, *, nodes: int = 2, cache_size_mib: int = 512, dcs: tuple[str, ...] = DEFAULT_DCS,
       config_overrides: dict[str, Any] | None = None,
       kafka_security: dict[str, SecureListener] | None = None, state: str = "sqlite",
       cache: str = "juicefs", alluxio_block_mib: int = 64, wan_rate: str | None = None) -> XdcConfig:
    """Start the stack (or return the running one's config). Returns the loaded config.

    `kafka_security`: datacenters whose broker listens with TLS (+ SASL); the stack makes one SASL
    user per such datacenter and writes the client settings into the config.
    `state`: "sqlite" (a file per datacenter) or "postgres" (one PostgreSQL server for the stack,
    a database per datacenter).
    `cache`: "juicefs" (`nodes` mounts of the datacenter's volume, `cache_size_mib` each) or
    "alluxio" (an Alluxio cluster of `nodes` workers, `cache_size_mib` of storage each, blocks of
    `alluxio_block_mib`; every bucket the config names is mounted in it).
    `wan_rate`: the WAN mode (see the module doc), the link limited to this tc rate ("200mbit")."""
    if cache not in CACHES:
        raise StackError(f"cache: one of {', '.join(CACHES)}, not {cache!r}")
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    old = StackState.load(run)
    if old and old.procs and all(alive(p) for p in old.procs):
        return open_config(run)
    if old:
        down(run)
    if wan_rate and (kafka_security or state != "sqlite" or cache != "juicefs"):
        raise StackError("the WAN mode runs plaintext brokers, SQLite state and JuiceFS caches")
    stk = StackState(str(run))
    creds: dict[str, str] = {}
    wan: Wan | None = None
    try:
        if wan_rate:
            wan = Wan.create(dcs, rate=wan_rate)
            stk.wan = wan.to_json()
            stk.save()
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
            gw = start_gateway(run, dc, metas[dc], key, secret, wan=wan)
            stk.procs.append(gw)
            stk.save()
            ports[dc] = {"s3": gw.port or 0}
        users: dict[str, dict[str, str]] = {}
        for dc, sec in (kafka_security or {}).items():
            if sec.sasl_mechanism:
                user, password = f"xdc-{dc.lower()}", secrets.token_urlsafe(18)
                creds[f"XDC_{dc}_KAFKA_USER"], creds[f"XDC_{dc}_KAFKA_PASSWORD"] = user, password
                users[dc] = {user: password}
        clusters: dict[str, alluxio.LocalAlluxio] = {}
        with ThreadPoolExecutor(len(dcs), thread_name_prefix="alluxio") as pool:
            # The Alluxio JVMs start while the brokers do (both mostly wait on one core each).
            pending = {dc: pool.submit(alluxio.start_cluster, run, dc, f"http://127.0.0.1:{ports[dc]['s3']}",
                                       creds[f"XDC_{dc}_ACCESS_KEY"], creds[f"XDC_{dc}_SECRET_KEY"],
                                       root_bucket=f"idc{dc.lower()}-alluxio", workers=nodes,
                                       quota_mib=cache_size_mib, block_size_mib=alluxio_block_mib)
                       for dc in dcs} if cache == "alluxio" and nodes else {}
            try:
                for dc, br in _start_brokers(run, dcs, stk, kafka_security or {}, users, wan).items():
                    ports[dc]["kafka"] = br.port or 0
                    ports[dc]["notify"] = WAN_NOTIFY_PORT if wan else free_port()
            finally:
                errors = _record_clusters(stk, pending, clusters)
            if errors:
                raise errors[0]
        secrets_path = run / SECRETS_FILE
        secrets_path.write_text("".join(f"{k}={v}\n" for k, v in creds.items()))
        secrets_path.chmod(0o600)
        data = stack_config(run, ports, metas, nodes=nodes, cache_size_mib=cache_size_mib, dcs=dcs,
                            kafka_security=kafka_security, state_urls=state_urls,
                            caches={dc: c.cache_config(placement="replicate") for dc, c in clusters.items()}, wan=wan)
        data = _merge(data, config_overrides or {})
        os.environ.update(creds)
        cfg = parse_config(data, base_dir=run)
        (run / CONFIG_FILE).write_text("# written by `xdc stack up`; secrets are in secrets.env\n"
                                       + yaml.safe_dump(data, sort_keys=False))
        gw_host = {dc: wan.internal(dc) if wan else "127.0.0.1" for dc in dcs}
        buckets = _provision(cfg, {dc: f"http://{gw_host[dc]}:{ports[dc]['s3']}" for dc in dcs})  # the proxies publish on its topics
        for dc in dcs:
            stk.procs.append(start_notifying_proxy(run, dc, ports[dc]["s3"], ports[dc]["notify"], wan=wan))
            stk.save()
        for dc, c in clusters.items():
            for b in sorted(buckets[dc]):
                alluxio.mount_bucket(c, b)
        for dc in dcs:
            dc_cache = cfg.dc(dc).cache
            if dc_cache is None or dc_cache.backend != "juicefs":
                continue
            for node in dc_cache.nodes:
                mount_node(dc_cache.meta_url, node, ca_bundle=dc_cache.storage_ca_bundle)
                stk.mounts.append({"dc": dc, "node": node.name, "mount": str(node.mount)})
                stk.save()
        stk.save()
        return cfg
    except BaseException:
        stk.save()
        down(run)
        raise


def _record_clusters(stk: StackState, pending: dict[str, Future[alluxio.LocalAlluxio]],
                     clusters: dict[str, alluxio.LocalAlluxio]) -> list[BaseException]:
    """Wait for the Alluxio starts; record each started cluster (its processes for `down`)."""
    errors: list[BaseException] = []
    for dc, fut in pending.items():
        try:
            c = fut.result()
        except Exception as exc:  # noqa: BLE001 - raised by the caller, after the others are recorded
            errors.append(exc)
            continue
        clusters[dc] = c
        stk.procs.extend(c.procs)
        stk.alluxio[dc] = c.to_dict() | {"procs": []}
        log.info("alluxio %s ready (RSS %.0f MiB)", dc, sum(alluxio.rss_mib(p) for p in c.procs))
    stk.save()
    return errors


def alluxio_cluster(run_dir: str | Path, dc: str) -> alluxio.LocalAlluxio | None:
    """The Alluxio cluster the stack in `run_dir` runs for `dc` (None: its cache is not Alluxio)."""
    stk = StackState.load(Path(run_dir))
    if stk is None or dc not in stk.alluxio:
        return None
    c = alluxio.LocalAlluxio.from_dict(stk.alluxio[dc])
    c.procs = [p for p in stk.procs if p.name.startswith(f"alluxio-{dc}-")]
    return c


def ensure_bucket(run_dir: str | Path, cfg: XdcConfig, dc: str, bucket: str) -> None:
    """Create a bucket in a datacenter of the running stack, mounted in its Alluxio if it runs one
    (an Alluxio namespace sees only mounted buckets; the JuiceFS mounts see every bucket)."""
    with Topology(cfg, dc) as topo:
        topo.here.store.ensure_bucket(bucket)
    c = alluxio_cluster(run_dir, dc)
    if c is not None:
        alluxio.mount_bucket(c, bucket)


def _start_brokers(run: Path, dcs: tuple[str, ...], state: StackState, security: dict[str, SecureListener],
                   users: dict[str, dict[str, str]], wan: Wan | None = None) -> dict[str, Proc]:
    """One broker per datacenter, started side by side (a JVM start is mostly waiting on one core);
    each is recorded in the state as soon as it runs, so `down` stops it whatever fails later."""
    kafka_broker.ensure_jars()  # once, before the threads
    started: dict[str, Proc] = {}
    with ThreadPoolExecutor(len(dcs), thread_name_prefix="broker") as pool:
        futures = {dc: pool.submit(start_broker, run, dc, secure=security.get(dc), users=users.get(dc), wan=wan)
                   for dc in dcs}
        errors = []
        for dc, fut in futures.items():
            try:
                started[dc] = fut.result()
                state.procs.append(started[dc])
            except Exception as exc:  # noqa: BLE001 - raised below, after the others are recorded
                errors.append(exc)
        state.save()
    if errors:
        raise errors[0]
    return started


def _provision(cfg: XdcConfig, gateways: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Buckets and topics the config names, in each datacenter (buckets through the gateways
    themselves when given: the proxies in front of them are not up yet). Returns the buckets per datacenter."""
    buckets: dict[str, set[str]] = {dc: set(d.buckets) for dc, d in cfg.datacenters.items()}
    for r in cfg.routes:
        buckets[r.source.dc].add(r.source.bucket)
        buckets[r.target.dc].add(r.target.bucket)
    for dc, names in buckets.items():
        with Topology(cfg, dc) as topo:
            site = topo.here
            store = S3Store(gateways[dc], *site.config.s3.credentials.resolve()) if gateways else site.store
            for b in sorted(names):
                store.ensure_bucket(b)
            k = site.config.kafka
            ensure_topics(site.brokers, list(k.topics.model_dump().values()), k.partitions)
    return buckets


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def open_config(run_dir: str | Path, dc: str | None = None) -> XdcConfig:
    """The running stack's config, its generated credentials put into this process's environment."""
    run = Path(run_dir)
    if (run / SECRETS_FILE).exists():
        load_env_file(run / SECRETS_FILE)
    return load_config(run / CONFIG_FILE, dc=dc)


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    state = StackState.load(Path(run_dir))
    if state is None:
        return []
    rows: list[dict[str, Any]] = [{"name": p.name, "pid": p.pid, "port": p.port, "alive": alive(p), "log": p.log}
                                  for p in state.procs]
    for p, row in zip(state.procs, rows, strict=True):
        if p.ready_s is not None:
            row["ready_s"] = p.ready_s
        if row["alive"]:
            row["rss_mib"] = round(rss_mib(p.pid), 1)
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
    if state.wan:
        Wan.from_json(state.wan).destroy()
    state.procs, state.mounts, state.alluxio, state.wan = [], [], {}, None
    state.save()
    return n


def wan(run_dir: str | Path) -> Wan:
    """The WAN link of a stack started in WAN mode (cut, restore, addresses, exec prefixes)."""
    state = StackState.load(Path(run_dir))
    if state is None or not state.wan:
        raise StackError(f"no stack in WAN mode in {run_dir}")
    return Wan.from_json(state.wan)


def _umount(mount: str) -> None:
    r = subprocess.run([juicefs_bin(), "umount", mount], capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run([juicefs_bin(), "umount", "--force", mount], capture_output=True, text=True)


def restart_broker(run_dir: str | Path, dc: str, *, hard: bool = True, timeout: float = 90.0) -> Proc:
    """Stop one datacenter's broker (`hard`: SIGKILL, a crash; else SIGTERM, a clean shutdown) and
    start it again on the same data directory and port (fault tests). Returns the new process."""
    run = Path(run_dir)
    state = StackState.load(run)
    if state is None:
        raise StackError("no stack in " + str(run))
    old = next(p for p in state.procs if p.name == f"broker-{dc}")
    if hard:
        kill_proc(old)
    else:
        stop_proc(old, timeout=30)
    host = Wan.from_json(state.wan).internal(dc) if state.wan else "127.0.0.1"
    new = _start_kafka(old.name, old.cmd, Path(old.log), old.port or 0, timeout, host=host)
    state.procs[state.procs.index(old)] = new
    state.save()
    return new
