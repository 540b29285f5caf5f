"""Alluxio 2.9's own HTTP interfaces, as a small client: the proxy, the master and the job master.

    proxy       POST /api/v1/paths/{path}/get-status | list-status | free | delete | mount
    master      GET  /api/v1/master/info                 (workers: capacity, used bytes, state)
    job master  POST /api/v1/master/job/run              (a JobConfig as JSON, "@type" = Java class)
                GET  /api/v1/master/job/get_status?jobId=N

The proxy serves these paths only with `alluxio.proxy.s3.v2.version.enabled=false` (the v2 S3
servlet otherwise takes every /api/v1/* request and answers 200 with an empty body).
Connections are kept alive per thread (the backend calls from a few threads at once). Every error
becomes a `CacheError` here, once; a path that does not exist is `AlluxioNotFound`.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xdc.errors import CacheError

LOAD_CONFIG = "alluxio.job.plan.load.LoadConfig"
BATCHED_CONFIG = "alluxio.job.plan.BatchedJobConfig"
TIMEOUT = 60.0


class AlluxioNotFound(CacheError):
    """The path does not exist in Alluxio's namespace (nor, after a metadata sync, in the UFS)."""


@dataclass(frozen=True)
class WorkerAddress:
    host: str
    rpc_port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    @classmethod
    def parse(cls, text: str) -> WorkerAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise CacheError(f"an Alluxio worker address is host:rpc_port, got {text!r}")
        return cls(host, int(port))


@dataclass(frozen=True)
class BlockView:
    block_id: int
    length: int
    workers: tuple[WorkerAddress, ...]  # where the block is held in Alluxio storage


@dataclass(frozen=True)
class FileView:
    path: str
    length: int
    folder: bool
    blocks: tuple[BlockView, ...]

    def bytes_on(self, worker: WorkerAddress) -> int:
        """Bytes of this file held by one worker: the sum of its blocks' exact lengths there."""
        return sum(b.length for b in self.blocks if worker in b.workers)


@dataclass(frozen=True)
class WorkerView:
    address: WorkerAddress
    state: str
    capacity: int
    used: int


@dataclass(frozen=True)
class JobView:
    job_id: int
    status: str  # CREATED, RUNNING, COMPLETED, FAILED, CANCELED
    error: str

    @property
    def done(self) -> bool:
        return self.status in ("COMPLETED", "FAILED", "CANCELED")


def _host_port(hp: str) -> tuple[str, int]:
    host, _, port = hp.rpartition(":")
    if not host or not port.isdigit():
        raise CacheError(f"expected host:port, got {hp!r}")
    return host, int(port)


class _Http:
    """JSON over HTTP/1.1 to one host:port, one kept-alive connection per thread."""

    def __init__(self, hostport: str, what: str, timeout: float = TIMEOUT) -> None:
        self.host, self.port = _host_port(hostport)
        self.what = what
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = c
        return c

    def _drop(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (TimeoutError, http.client.HTTPException, ConnectionError, OSError) as exc:
                self._drop()
                # A kept-alive connection the server closed in between: one fresh retry.
                if attempt == 2 or isinstance(exc, socket.timeout):
                    raise CacheError(f"{self.what} {self.host}:{self.port}: {method} {path}: {exc}") from exc
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, raw = self.call(method, path, body)
        if status != 200:
            _raise(self.what, path, status, raw)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise CacheError(f"{self.what}: {path}: not JSON: {raw[:200]!r}") from exc


def _raise(what: str, path: str, status: int, raw: bytes) -> None:
    try:
        doc = json.loads(raw)
        msg, code = str(doc.get("message", "")), str(doc.get("statusCode", ""))
    except (ValueError, AttributeError):
        msg, code = raw[:300].decode(errors="replace"), ""
    if code == "NOT_FOUND":
        raise AlluxioNotFound(msg or f"{path}: not found")
    raise CacheError(f"{what}: {path}: HTTP {status} {code}: {msg}")


def _quote(alluxio_path: str) -> str:
    # The proxy routes /paths/{path: .*}/verb: keep slashes, escape the rest.
    if not alluxio_path.startswith("/"):
        alluxio_path = "/" + alluxio_path
    return urllib.parse.quote(alluxio_path, safe="/")


def _file_view(doc: Mapping[str, Any]) -> FileView:
    blocks = []
    for fb in doc.get("fileBlockInfos") or []:
        bi = fb.get("blockInfo") or {}
        workers = tuple(
            WorkerAddress(loc["workerAddress"]["host"], int(loc["workerAddress"]["rpcPort"]))
            for loc in bi.get("locations") or []
        )
        blocks.append(BlockView(int(bi.get("blockId", 0)), int(bi.get("length", 0)), workers))
    return FileView(str(doc["path"]), int(doc.get("length", 0)), bool(doc.get("folder")), tuple(blocks))


class AlluxioRest:
    """The three REST endpoints of one Alluxio cluster (host:port of each web port)."""

    def __init__(self, *, proxy: str, master: str, job_master: str, timeout: float = TIMEOUT) -> None:
        self.proxy = _Http(proxy, "alluxio proxy", timeout)
        self.master = _Http(master, "alluxio master", timeout)
        self.job_master = _Http(job_master, "alluxio job master", timeout)

    # -- namespace (proxy) --------------------------------------------------------------------
    def get_status(self, path: str) -> FileView:
        return _file_view(self.proxy.json("POST", f"/api/v1/paths/{_quote(path)}/get-status", {}))

    def list_status(self, path: str) -> list[FileView]:
        docs = self.proxy.json("POST", f"/api/v1/paths/{_quote(path)}/list-status", {}) or []
        return [_file_view(d) for d in docs]

    def free(self, path: str) -> None:
        """Ask the master to drop the file's blocks from every worker (applied on the next heartbeats)."""
        self.proxy.json("POST", f"/api/v1/paths/{_quote(path)}/free", {"recursive": False, "forced": False})

    def forget(self, path: str) -> None:
        """Drop the file's metadata from Alluxio only (the S3 object stays; the next status reloads it)."""
        self.proxy.json("POST", f"/api/v1/paths/{_quote(path)}/delete", {"recursive": False, "alluxioOnly": True})

    def mount(self, path: str, ufs: str, properties: Mapping[str, str]) -> None:
        q = urllib.parse.urlencode({"src": ufs})
        self.proxy.json("POST", f"/api/v1/paths/{_quote(path)}/mount?{q}", {"properties": dict(properties)})

    # -- cluster (master) ---------------------------------------------------------------------
    def workers(self) -> list[WorkerView]:
        info = self.master.json("GET", "/api/v1/master/info")
        out = []
        for w in info.get("workers") or []:
            a = w["address"]
            out.append(WorkerView(WorkerAddress(a["host"], int(a["rpcPort"])), str(w.get("state", "")),
                                  int(w.get("capacityBytes", 0)), int(w.get("usedBytes", 0))))
        return out

    # -- jobs (job master) --------------------------------------------------------------------
    def run_load(self, paths: Sequence[str], *, replication: int, worker_hosts: Sequence[str] = ()) -> int:
        """Submit one job loading the files' blocks into workers (direct cache requests to them).

        One path: a Load job; several: a Batched job of Loads. `worker_hosts` limits the workers
        (Alluxio matches them by host, upper-cased); `replication` counts every worker holding a block.
        """
        def one(p: str) -> dict[str, Any]:
            cfg: dict[str, Any] = {"@type": LOAD_CONFIG, "filePath": p, "replication": replication,
                                   "directCache": True}
            if worker_hosts:
                cfg["workerSet"] = sorted({h.upper() for h in worker_hosts})
            return cfg

        if len(paths) == 1:
            body: dict[str, Any] = one(paths[0])
        else:
            # A batch carries its jobs as string maps; list values do not survive that: one host only.
            if len(worker_hosts) > 1:
                raise CacheError("a batched load names at most one worker host")
            subs = []
            for p in paths:
                c = {k: (v[0] if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v))
                     for k, v in one(p).items()}
                subs.append(c)
            body = {"@type": BATCHED_CONFIG, "jobType": "Load", "jobConfig": subs}
        out = self.job_master.json("POST", "/api/v1/master/job/run", body)
        try:
            return int(out)
        except (TypeError, ValueError) as exc:
            raise CacheError(f"alluxio job master: run returned {out!r}") from exc

    def job(self, job_id: int) -> JobView:
        d = self.job_master.json("GET", f"/api/v1/master/job/get_status?jobId={job_id}")
        return JobView(job_id, str(d.get("status", "")), str(d.get("errorMessage", "") or ""))

    def wait_job(self, job_id: int, timeout: float, poll: float = 0.1) -> JobView:
        deadline = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if j.done:
                return j
            if time.monotonic() > deadline:
                raise CacheError(f"alluxio job {job_id} still {j.status} after {timeout:.0f}s")
            time.sleep(poll)


__all__ = ["AlluxioNotFound", "AlluxioRest", "BlockView", "FileView", "JobView", "WorkerAddress", "WorkerView"]
