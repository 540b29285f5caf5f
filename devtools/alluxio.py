"""A real Alluxio 2.9 cluster for one datacenter, started with `java` from Maven Central jars.

Per datacenter, all on loopback addresses and free ports:

    master, job master, proxy (REST)   127.0.0.1
    worker i + job worker i            127.0.0.(i+1)     storage: a directory tier in the run dir

Why one address per worker: Alluxio's job service pairs each block worker with the job worker of
the same *host* (LoadDefinition keys job workers by host name), as in a real cluster with one
worker per machine. Two workers on one address would collide there; 127.0.0.0/8 is all loopback.

The root under-storage is the datacenter's S3 endpoint (s3a, path-style, the internal URL) on a
bucket of its own (`root_bucket`); each data bucket is mounted at /<bucket> (`mount_bucket`), so an
object s3://B/K is the Alluxio file /B/K, like <mount>/B/K on a JuiceFS node. S3 credentials reach
the JVMs as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the SDK's default chain), never a file.

Jars: `devtools/maven/alluxio/pom.xml`, copied by Maven into `.xdc/maven/alluxio/lib` (`fetch_jars`,
306 jars, 211 MB, ~15 s from Maven Central with an empty ~/.m2).
Measured on this 2-core machine under other engineers' load (load average 7-15): start to ready
32-41 s with one worker, 78 s with two; RSS master ~270-330 MiB, worker ~140-160, job master
~140, job worker ~130, proxy ~130: ~0.8 GiB per datacenter with one worker, ~1.2 GiB with two.
Runs on Java 17 without --add-opens (measured, 2.9.6). Things this module sets and why:
  - alluxio.logs.dir / alluxio.home only as -D (Alluxio refuses them in alluxio-site.properties);
  - alluxio.master.update.check.enabled=false and AWS_EC2_METADATA_DISABLED: otherwise the master
    phones home and the AWS SDK probes the EC2 metadata address (traffic off this machine);
  - alluxio.proxy.s3.v2.version.enabled=false: else the proxy's /api/v1/paths REST answers empty;
  - alluxio.user.file.metadata.sync.interval=0: objects put into S3 after Alluxio listed a
    directory are seen (and deleted ones are gone) at the next status call;
  - alluxio.user.worker.list.refresh.interval=2s: the job master learns new workers quickly.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cache_client.alluxio_rest import AlluxioNotFound, AlluxioRest
from devtools.procs import Proc, StackError, alive, free_port, spawn, stop_proc
from xdc.errors import XdcError
from xdc.io.store import S3Store
from xdc.retry import RetryPolicy

log = logging.getLogger(__name__)

ALLUXIO_VERSION = "2.9.6"
REPO = Path(__file__).resolve().parents[1]
POM = REPO / "devtools" / "maven" / "alluxio" / "pom.xml"
DEFAULT_LIB = REPO / ".xdc" / "maven" / "alluxio" / "lib"
JAVA_17 = Path("/usr/lib/jvm/java-17-openjdk-amd64/bin/java")
MASTER_HOST = "127.0.0.1"
# Small heaps, client compiler only, serial GC: 7 JVMs per datacenter share 2 cores.
JVM_FLAGS = ("-Xms32m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:ReservedCodeCacheSize=64m",
             "-XX:MaxDirectMemorySize=256m", "-Dcom.amazonaws.sdk.disableEc2Metadata=true")
MAIN = {
    "master": "alluxio.master.AlluxioMaster",
    "job-master": "alluxio.master.AlluxioJobMaster",
    "worker": "alluxio.worker.AlluxioWorker",
    "job-worker": "alluxio.worker.AlluxioJobWorker",
    "proxy": "alluxio.proxy.AlluxioProxy",
    "shell": "alluxio.cli.fs.FileSystemShell",
}
LOG4J = """\
log4j.rootLogger=INFO, out
log4j.appender.out=org.apache.log4j.ConsoleAppender
log4j.appender.out.layout=org.apache.log4j.PatternLayout
log4j.appender.out.layout.ConversionPattern=%d{ISO8601} %-5p [%t] %c{1}: %m%n
# one line per REST request / loaded block otherwise
log4j.logger.alluxio.web.ProxyWebServer=WARN
log4j.logger.alluxio.job.plan.load.LoadDefinition=WARN
log4j.logger.alluxio.worker.job.task=WARN
log4j.logger.org.eclipse.jetty=WARN
"""
LOG4J_SHELL = """\
log4j.rootLogger=WARN, err
log4j.appender.err=org.apache.log4j.ConsoleAppender
log4j.appender.err.Target=System.err
log4j.appender.err.layout=org.apache.log4j.PatternLayout
log4j.appender.err.layout.ConversionPattern=%d{ISO8601} %-5p %c{1}: %m%n
"""


class AlluxioStartError(StackError):
    pass


# -- jars and java ---------------------------------------------------------------------------------
def lib_dir() -> Path:
    return Path(os.environ.get("XDC_ALLUXIO_LIB") or DEFAULT_LIB)


def java_bin() -> str:
    """$XDC_JAVA, else Debian's Java 17, else `java` on PATH."""
    cand = os.environ.get("XDC_JAVA") or (str(JAVA_17) if JAVA_17.exists() else shutil.which("java"))
    if not cand or not Path(cand).exists():
        raise AlluxioStartError("java not found: apt-get install openjdk-17-jre-headless (or set XDC_JAVA)")
    return cand


def fetch_jars(lib: Path | None = None) -> Path:
    """Copy the pom's jars (Maven Central, cached in ~/.m2) into `lib` once per pom version."""
    lib = lib or lib_dir()
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    stamp = lib / ".pom.sha256"
    if stamp.exists() and stamp.read_text() == digest:
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise AlluxioStartError("mvn not found: apt-get install maven (fetches the Alluxio jars from Maven Central)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.parent / ".fetch.lock", "w") as lock:  # two test sessions may fetch at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == digest:
            return lib
        tmp = lib.with_name(lib.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cp = subprocess.run([mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                             "-DexcludeScope=provided", f"-DoutputDirectory={tmp}"],
                            check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
        if cp.returncode != 0:
            raise AlluxioStartError(f"mvn copy-dependencies failed ({cp.returncode}): {(cp.stdout + cp.stderr)[-2000:]}")
        shutil.rmtree(lib, ignore_errors=True)
        tmp.rename(lib)
        stamp.write_text(digest)
    return lib


# -- the cluster description -----------------------------------------------------------------------
@dataclass
class WorkerSpec:
    name: str
    host: str
    rpc_port: int
    web_port: int
    job_rpc_port: int
    job_data_port: int
    job_web_port: int
    store_dir: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.rpc_port}"


@dataclass
class LocalAlluxio:
    """What `start_cluster` started for one datacenter (JSON-able: the stack records it)."""

    dc: str
    home: str
    master_rpc: int
    master_web: int
    job_master_rpc: int
    job_master_web: int
    proxy_port: int
    workers: list[WorkerSpec]
    root_ufs: str
    s3_url: str
    procs: list[Proc] = field(default_factory=list)

    @property
    def master(self) -> str:
        return f"{MASTER_HOST}:{self.master_web}"

    @property
    def job_master(self) -> str:
        return f"{MASTER_HOST}:{self.job_master_web}"

    @property
    def proxy(self) -> str:
        return f"{MASTER_HOST}:{self.proxy_port}"

    def cache_config(self, *, placement: str = "replicate", **extra: Any) -> dict[str, Any]:
        """The datacenter's `cache:` block for this cluster (xdc.config.CacheConfig)."""
        return {
            "backend": "alluxio",
            "placement": placement,
            "alluxio": {"master": self.master, "job_master": self.job_master, "proxy": self.proxy},
            "nodes": [{"name": w.name, "worker": w.address} for w in self.workers],
            **extra,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LocalAlluxio:
        d = dict(d)
        d["workers"] = [WorkerSpec(**w) for w in d["workers"]]
        d["procs"] = [Proc(**p) for p in d.get("procs", [])]
        return cls(**d)


def site_properties(c: LocalAlluxio, *, quota_mib: int, block_size_mib: int) -> dict[str, str]:
    """alluxio-site.properties shared by every process of the cluster (per-worker keys go on -D)."""
    h = MASTER_HOST
    endpoint_opts = {
        "alluxio.underfs.s3.endpoint": c.s3_url,
        "alluxio.underfs.s3.endpoint.region": "us-east-1",
        "alluxio.underfs.s3.disable.dns.buckets": "true",  # path-style: http://host:port/bucket/key
        "alluxio.underfs.s3.inherit.acl": "false",
    }
    props = {
        "alluxio.master.hostname": h, "alluxio.master.bind.host": h, "alluxio.master.web.bind.host": h,
        "alluxio.master.web.hostname": h,
        "alluxio.master.rpc.port": str(c.master_rpc), "alluxio.master.web.port": str(c.master_web),
        "alluxio.master.journal.type": "UFS",
        "alluxio.master.journal.folder": str(Path(c.home) / "journal"),
        "alluxio.master.metastore": "HEAP",
        "alluxio.master.mount.table.root.ufs": c.root_ufs,
        **{f"alluxio.master.mount.table.root.option.{k}": v for k, v in endpoint_opts.items()},
        "alluxio.master.update.check.enabled": "false",
        "alluxio.master.daily.backup.enabled": "false",
        "alluxio.master.worker.info.cache.refresh.time": "1s",
        "alluxio.job.master.hostname": h, "alluxio.job.master.bind.host": h, "alluxio.job.master.web.bind.host": h,
        "alluxio.job.master.web.hostname": h,
        "alluxio.job.master.rpc.port": str(c.job_master_rpc), "alluxio.job.master.web.port": str(c.job_master_web),
        "alluxio.proxy.web.hostname": h, "alluxio.proxy.web.bind.host": h, "alluxio.proxy.web.port": str(c.proxy_port),
        "alluxio.proxy.s3.v2.version.enabled": "false",
        "alluxio.security.authentication.type": "NOSASL",
        "alluxio.security.authorization.permission.enabled": "false",
        "alluxio.worker.tieredstore.levels": "1",
        "alluxio.worker.tieredstore.level0.alias": "SSD",
        "alluxio.worker.tieredstore.level0.dirs.quota": f"{quota_mib}MB",
        "alluxio.user.block.size.bytes.default": f"{block_size_mib}MB",
        "alluxio.user.file.metadata.sync.interval": "0",
        "alluxio.user.worker.list.refresh.interval": "2s",
        "alluxio.user.hostname": h,
        # Job tasks are handed out and reported on job worker heartbeats, freed blocks leave on
        # block heartbeats: 1 s by default, the bulk of a small load's or free's latency.
        "alluxio.job.master.worker.heartbeat.interval": "100ms",
        "alluxio.worker.block.heartbeat.interval": "200ms",
    }
    return props


def _worker_flags(w: WorkerSpec) -> list[str]:
    return [f"-D{k}={v}" for k, v in {
        "alluxio.worker.hostname": w.host, "alluxio.worker.bind.host": w.host,
        "alluxio.worker.web.hostname": w.host, "alluxio.worker.web.bind.host": w.host,
        "alluxio.worker.rpc.port": w.rpc_port, "alluxio.worker.web.port": w.web_port,
        "alluxio.worker.tieredstore.level0.dirs.path": w.store_dir,
        "alluxio.job.worker.hostname": w.host, "alluxio.job.worker.bind.host": w.host,
        "alluxio.job.worker.web.bind.host": w.host,
        "alluxio.job.worker.rpc.port": w.job_rpc_port, "alluxio.job.worker.data.port": w.job_data_port,
        "alluxio.job.worker.web.port": w.job_web_port,
        "alluxio.user.hostname": w.host,  # "local worker" for the job worker's loads
    }.items()]


def java_cmd(home: Path, main: str, heap_mib: int, extra: list[str] | None = None, lib: Path | None = None,
             log4j: str = "log4j.properties") -> list[str]:
    """`java ... MAIN` for one Alluxio process of the cluster living in `home`."""
    return [java_bin(), *JVM_FLAGS, f"-Xmx{heap_mib}m", "-cp", str((lib or lib_dir()) / "*"),
            f"-Dalluxio.home={home}", f"-Dalluxio.conf.dir={home / 'conf'}", f"-Dalluxio.logs.dir={home / 'logs'}",
            f"-Dlog4j.configuration=file:{home / 'conf' / log4j}", *(extra or []), main]


def s3_env(access_key: str, secret_key: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


# -- start / ready / stop --------------------------------------------------------------------------
def start_cluster(run_dir: Path, dc: str, s3_url: str, access_key: str, secret_key: str, *,
                  root_bucket: str, workers: int = 1, quota_mib: int = 256, block_size_mib: int = 64,
                  heap_mib: int = 160, master_heap_mib: int = 256, timeout: float = 240.0,
                  lib: Path | None = None) -> LocalAlluxio:
    """Start one datacenter's Alluxio (master, job master, workers, job workers, proxy); wait ready.

    `run_dir/alluxio-<dc>` holds conf, journal, worker storage and logs (run_dir/logs/alluxio-<dc>-*.log).
    The S3 endpoint's `root_bucket` is created if missing. On any failure everything started is stopped.
    """
    if not 1 <= workers <= 8:
        raise AlluxioStartError("workers: 1..8 (one loopback address each)")
    lib = fetch_jars(lib)
    home = (Path(run_dir) / f"alluxio-{dc}").resolve()
    for sub in ("conf", "journal", "logs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    S3Store(s3_url, access_key, secret_key, retry=RetryPolicy(max_attempts=3)).ensure_bucket(root_bucket)

    specs = []
    for i in range(workers):
        store = home / f"worker{i}"
        store.mkdir(exist_ok=True)
        specs.append(WorkerSpec(f"{dc.lower()}{i}", f"127.0.0.{i + 1}", free_port(), free_port(), free_port(),
                                free_port(), free_port(), str(store)))
    c = LocalAlluxio(dc, str(home), free_port(), free_port(), free_port(), free_port(), free_port(), specs,
                     f"s3a://{root_bucket}/", s3_url)
    props = site_properties(c, quota_mib=quota_mib, block_size_mib=block_size_mib)
    (home / "conf" / "alluxio-site.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (home / "conf" / "log4j.properties").write_text(LOG4J)
    (home / "conf" / "log4j-shell.properties").write_text(LOG4J_SHELL)

    env = s3_env(access_key, secret_key)
    logs = Path(run_dir) / "logs"
    t0 = time.monotonic()
    try:
        def start(name: str, main: str, heap: int, extra: list[str] | None = None, port: int | None = None) -> None:
            c.procs.append(spawn(f"alluxio-{dc}-{name}", java_cmd(home, MAIN[main], heap, extra, lib),
                                  logs / f"alluxio-{dc}-{name}.log", env, port))

        start("master", "master", master_heap_mib, port=c.master_web)
        for i, w in enumerate(specs):
            start(f"worker{i}", "worker", heap_mib, _worker_flags(w), w.rpc_port)
        # The job master lists the block workers once they registered: start it after them.
        _wait_master(c, len(specs), time.monotonic() + timeout)
        start("job-master", "job-master", heap_mib, port=c.job_master_web)
        # A job worker that reaches the job master before its services are registered exits
        # ("Service JOB_MASTER_WORKER_SERVICE is not found"): start them once it answers.
        _poll(c, "job master", lambda: _get_json(f"http://{c.job_master}/api/v1/master/job/list") is not None,
              time.monotonic() + timeout)
        for i, w in enumerate(specs):
            start(f"job-worker{i}", "job-worker", heap_mib, _worker_flags(w), w.job_rpc_port)
        start("proxy", "proxy", heap_mib, port=c.proxy_port)
        wait_ready(c, timeout=max(10.0, timeout - (time.monotonic() - t0)))
    except BaseException:
        stop_cluster(c)
        raise
    log.info("alluxio %s ready in %.1fs", dc, time.monotonic() - t0)
    return c


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return json.loads(r.read() or b"null")


def _post_json(url: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback only
        raw = r.read()
        return r.status, json.loads(raw) if raw else None


def _check_alive(c: LocalAlluxio) -> None:
    for p in c.procs:
        if not alive(p):
            tail = Path(p.log).read_text(errors="replace")[-3000:] if Path(p.log).exists() else ""
            raise AlluxioStartError(f"{p.name} exited during start-up; log {p.log}:\n{tail}")


def _poll(c: LocalAlluxio, what: str, check: Any, deadline: float) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        _check_alive(c)
        try:
            if check():
                return
        except (OSError, ValueError, KeyError, TypeError) as exc:  # not up yet / safe mode (HTTP 500)
            last = exc
        time.sleep(0.25)
    raise AlluxioStartError(f"alluxio {c.dc}: {what} not ready (last error: {last})")


def _wait_master(c: LocalAlluxio, n_workers: int, deadline: float) -> None:
    want = {w.address for w in c.workers[:n_workers]}

    def ok() -> bool:
        info = _get_json(f"http://{c.master}/api/v1/master/info")
        live = {f"{w['address']['host']}:{w['address']['rpcPort']}" for w in info.get("workers") or []
                if w.get("state", "ACTIVE") == "ACTIVE"}
        return want <= live

    _poll(c, f"master with {n_workers} workers", ok, deadline)


def wait_ready(c: LocalAlluxio, timeout: float = 180.0) -> float:
    """Block until the master has every worker, the job master every job worker, the proxy answers.

    Returns the seconds waited. Raises AlluxioStartError (with the log tail) if a process exits.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    _wait_master(c, len(c.workers), deadline)
    hosts = {w.host for w in c.workers}

    def jobs_ok() -> bool:
        info = _get_json(f"http://{c.job_master}/api/v1/job_master/info")
        return hosts <= {w["address"]["host"] for w in info.get("workers") or []}

    _poll(c, "job master with every job worker", jobs_ok, deadline)

    def proxy_ok() -> bool:
        status, doc = _post_json(f"http://{c.proxy}/api/v1/paths///get-status", {})
        return status == 200 and isinstance(doc, dict) and doc.get("folder") is True

    _poll(c, "proxy", proxy_ok, deadline)
    return time.monotonic() - t0


def stop_cluster(c: LocalAlluxio, timeout: float = 8.0) -> None:
    """Stop what start_cluster started: proxy and job workers, then workers, then the masters."""
    order = ["proxy", "job-worker", "worker", "job-master", "master"]

    def rank(p: Proc) -> int:
        role = p.name.split(f"alluxio-{c.dc}-", 1)[-1].rstrip("0123456789")
        return order.index(role) if role in order else 0

    for p in sorted(c.procs, key=rank):
        stop_proc(p, timeout=timeout)


def rss_mib(p: Proc) -> float:
    """Resident memory of a started process (the java process is the recorded pid)."""
    try:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- namespace ---------------------------------------------------------------------------------------
def mount_bucket(c: LocalAlluxio, bucket: str) -> None:
    """Mount s3a://<bucket>/ at /<bucket> (idempotent: an existing mount point is left alone)."""
    rest = AlluxioRest(proxy=c.proxy, master=c.master, job_master=c.job_master)
    try:
        rest.get_status("/" + bucket)
        return
    except AlluxioNotFound:
        pass
    rest.mount("/" + bucket, f"s3a://{bucket}/", {
        "alluxio.underfs.s3.endpoint": c.s3_url,
        "alluxio.underfs.s3.endpoint.region": "us-east-1",
        "alluxio.underfs.s3.disable.dns.buckets": "true",
        "alluxio.underfs.s3.inherit.acl": "false",
    })


def shell(c: LocalAlluxio, *args: str, timeout: float = 600.0, lib: Path | None = None,
          env: dict[str, str] | None = None, extra_cp: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `alluxio fs ARGS` (the FileSystemShell from the same jars) against this cluster.

    `extra_cp` goes after the jars: only classes missing from them are taken from it.
    """
    home = Path(c.home)
    cmd = java_cmd(home, MAIN["shell"], 256, None, lib, "log4j-shell.properties")
    if extra_cp is not None:
        i = cmd.index("-cp") + 1
        cmd[i] = f"{cmd[i]}:{extra_cp}"
    cp = subprocess.run([*cmd, *args], check=False, capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL, cwd=home, env={**os.environ, **(env or {})})
    if cp.returncode != 0:
        raise XdcError(f"alluxio fs {' '.join(args)}: exit {cp.returncode}: {(cp.stdout + cp.stderr)[-1500:]}")
    return cp


# -- by hand: python -m devtools.alluxio fetch ----------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.alluxio")
    ap.add_argument("command", choices=["fetch"])
    a = ap.parse_args(argv)
    if a.command == "fetch":
        print(fetch_jars())
    return 0


if __name__ == "__main__":
    sys.exit(main())
