"""The local stack: two datacenters of real servers on 127.0.0.1, for the demo and the tests.

Per datacenter: an Apache Kafka broker (KRaft, one node, log on disk: devtools/kafka_broker.py),
an S3 endpoint (a JuiceFS gateway over a JuiceFS volume: file storage + SQLite metadata), its state
(a SQLite file, or with `state="postgres"` a database on one PostgreSQL server for the stack), and
N cache nodes (FUSE mounts of the same volume, each with its own cache dir). `up`
writes `xdc.yaml` and `secrets.env` into the run directory and records every process it started in
`stack.json`; `down` stops exactly those (pid and start time must still match) and unmounts its
mounts. A datacenter's broker can listen with TLS + SASL (`up(kafka_security={...})`).

WAN mode (`up(wan_rate="200mbit")`, root only): each datacenter's S3 gateway and broker run in a
network namespace of their own, joined to the other's by one rate-limited link (devtools/netns.py);
the config names each datacenter's internal address (its own processes, and this machine's root
namespace) and its external one (the other datacenter, across the link). `wan(run)` gives the link
to cut and restore; `run_in(run, dc, cmd)` is the prefix that runs a process inside a datacenter;
`down` removes the namespaces. State stays SQLite in this mode.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cache_client import juicefs
from cache_client.juicefs import juicefs_bin, mount_node
from devtools import kafka_broker, postgres
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
    wan: str | None = None  # the WAN mode's namespaces (netns.Wan as JSON), removed by `down`

    def save(self) -> None:
        Path(self.run_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> StackState | None:
        p = run_dir / STATE_FILE
        if not p.exists():
            return None
        d = json.loads(p.read_text())
        return cls(d["run_dir"], [Proc(**x) for x in d["procs"]], d.get("mounts", []), d.get("wan"))


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
def stack_config(run_dir: Path, ports: dict[str, dict[str, int]], metas: dict[str, str], *,
                 nodes: int, cache_size_mib: int, dcs: tuple[str, ...] = DEFAULT_DCS,
                 kafka_security: dict[str, SecureListener] | None = None,
                 state_urls: dict[str, str] | None = None, wan: Wan | None = None) -> dict[str, Any]:
    """The config the stack writes: one datacenter per name, routes A -> B. With `wan`, each
    datacenter's internal and external addresses are its namespace's (netns.Wan)."""
    datacenters: dict[str, Any] = {}
    for dc in dcs:
        d = dc.lower()
        inside, outside = (wan.internal(dc), wan.external(dc)) if wan else ("127.0.0.1", "127.0.0.1")
        dc_dir = run_dir / dc
        datacenters[dc] = {
            "s3": {"internal_url": f"http://{inside}:{ports[dc]['s3']}",
                   "external_url": f"http://{outside}:{ports[dc]['s3']}",
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
        if not nodes:
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
       wan_rate: str | None = None) -> XdcConfig:
    """Start the stack (or return the running one's config). Returns the loaded config.

    `kafka_security`: datacenters whose broker listens with TLS (+ SASL); the stack makes one SASL
    user per such datacenter and writes the client settings into the config.
    `state`: "sqlite" (a file per datacenter) or "postgres" (one PostgreSQL server for the stack,
    a database per datacenter).
    `wan_rate`: the WAN mode (see the module doc), the link limited to this tc rate ("200mbit")."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    old = StackState.load(run)
    if old and old.procs and all(alive(p) for p in old.procs):
        return open_config(run)
    if old:
        down(run)
    if wan_rate and (kafka_security or state != "sqlite"):
        raise StackError("the WAN mode runs plaintext brokers and SQLite state")
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
        for dc, br in _start_brokers(run, dcs, stk, kafka_security or {}, users, wan).items():
            ports[dc]["kafka"] = br.port or 0
        secrets_path = run / SECRETS_FILE
        secrets_path.write_text("".join(f"{k}={v}\n" for k, v in creds.items()))
        secrets_path.chmod(0o600)
        data = stack_config(run, ports, metas, nodes=nodes, cache_size_mib=cache_size_mib, dcs=dcs,
                            kafka_security=kafka_security, state_urls=state_urls, wan=wan)
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
            ensure_topics(site.brokers, list(k.topics.model_dump().values()), k.partitions)


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
    state.procs, state.mounts, state.wan = [], [], None
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
    new = _start_kafka(old.name, old.cmd, Path(old.log), old.port or 0, timeout)
    state.procs[state.procs.index(old)] = new
    state.save()
    return new
