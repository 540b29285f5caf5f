"""A fault-injecting HTTP proxy for S3 endpoints (fault tests, demos of resilience).

Sits on 127.0.0.1 in front of one S3 endpoint and passes requests through, except that it injects,
at configurable rates: 503 SlowDown (with S3's XML error body), connection resets (the request is
read, then the socket is closed with RST), added latency, and truncated response bodies (the full
Content-Length is announced, half the bytes are sent, then the connection is closed). Rules make a
fault permanent for matching requests (e.g. 403 AccessDenied on one key). Every injection is counted.

The Host header is forwarded unchanged, so SigV4 signatures made for the proxy's address verify
upstream. Bodies are buffered whole: this is a test tool for small objects, not a production proxy.
"""
from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

Fault = Literal["slowdown", "reset", "latency", "truncate", "access_denied", "internal_error"]
KINDS: tuple[Fault, ...] = ("slowdown", "reset", "latency", "truncate", "access_denied", "internal_error")

_ERRORS = {  # fault -> (status, S3 error code, message)
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "access_denied": (403, "AccessDenied", "Access Denied"),
    "internal_error": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass(frozen=True)
class Rule:
    """A fault that always happens for requests whose decoded path contains `path_contains`
    (e.g. "/bucket/key") and whose method is in `methods` (empty: any method)."""

    fault: Fault
    path_contains: str
    methods: tuple[str, ...] = ()

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method in self.methods) and self.path_contains in path


@dataclass
class FaultPlan:
    """Rates are probabilities per request, checked in this order: reset, slowdown, then
    (after forwarding) truncate; latency is independent and adds `latency_s` before forwarding."""

    slowdown: float = 0.0
    reset: float = 0.0
    latency: float = 0.0
    latency_s: float = 0.05
    truncate: float = 0.0
    truncate_min_bytes: int = 64  # only bodies at least this long are truncated (object GETs)
    methods: tuple[str, ...] = ()  # random faults only for these methods (empty: any)
    rules: list[Rule] = field(default_factory=list)
    seed: int | None = None


class FaultProxy:
    """`with FaultProxy(upstream, FaultPlan(...)) as p: ... p.url ... p.counts`"""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.plan = plan or FaultPlan()
        self.counts: Counter[str] = Counter()  # injected faults by kind, plus "requests"
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, decoded path) of every request
        self._lock = threading.Lock()
        self._rng = random.Random(self.plan.seed)
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def injected(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self.counts.items() if k != "requests"}

    # -- decisions (under the lock: one RNG, deterministic with a seed) --------------------------
    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def _roll(self, rate: float, method: str) -> bool:
        if rate <= 0 or (self.plan.methods and method not in self.plan.methods):
            return False
        with self._lock:
            return self._rng.random() < rate

    def decide_before(self, method: str, path: str) -> Fault | None:
        for r in self.plan.rules:
            if r.matches(method, path) and r.fault != "truncate":
                return r.fault
        if self._roll(self.plan.reset, method):
            return "reset"
        if self._roll(self.plan.slowdown, method):
            return "slowdown"
        return None

    def decide_truncate(self, method: str, path: str, body_len: int) -> bool:
        if method == "HEAD" or body_len < self.plan.truncate_min_bytes:
            return False
        if any(r.fault == "truncate" and r.matches(method, path) for r in self.plan.rules):
            return True
        return self._roll(self.plan.truncate, method)


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "expect"}  # botocore never signs Expect; the proxy answers 100-continue itself


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint

        def log_message(self, fmt: str, *args: object) -> None:  # quiet; counts tell the story
            log.debug("faultproxy: " + fmt, *args)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _error(self, fault: Fault) -> None:
            status, code, msg = _ERRORS[fault]
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
                    f"<Resource>{self.path.split('?')[0]}</Resource><RequestId>faultproxy</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            proxy._count("requests")
            method, path = self.command, unquote(self.path.split("?")[0])
            with proxy._lock:
                proxy.requests[(method, path)] += 1
            body = self._body()
            fault = proxy.decide_before(method, path)
            if fault == "reset":
                proxy._count("reset")
                self._reset()
                return
            if fault in _ERRORS:
                proxy._count(fault)  # type: ignore[arg-type]
                self._error(fault)  # type: ignore[arg-type]
                return
            if proxy._roll(proxy.plan.latency, method):
                proxy._count("latency")
                time.sleep(proxy.plan.latency_s)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or method in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                status, reason, rheaders = resp.status, resp.reason, resp.getheaders()
            finally:
                conn.close()
            truncate = proxy.decide_truncate(method, path, len(data))
            self.send_response(status, reason)
            for k, v in rheaders:
                # a HEAD's Content-Length is the object's size: pass it on as it is
                if k.lower() not in _HOP and (method == "HEAD" or k.lower() != "content-length"):
                    self.send_header(k, v)
            if method != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method == "HEAD":
                return
            if truncate:
                proxy._count("truncate")
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

    return Handler
