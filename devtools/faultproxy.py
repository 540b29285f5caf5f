"""A fault-injecting HTTP proxy for S3 endpoints (fault tests, demos of resilience).

Sits on 127.0.0.1 in front of one S3 endpoint and passes requests through, except that it injects,
at configurable rates: 503 SlowDown (with S3's XML error body), connection resets (the request is
read, then the socket is closed with RST), resets after the fact (the request is forwarded and
applied upstream, then the client's connection is reset instead of answered: a write that landed
while the client saw an error), damaged request bodies (bytes flipped on the way upstream),
added latency, and truncated response bodies (the full Content-Length is announced, half the
bytes are sent, then the connection is closed). Rules make a fault happen for matching requests,
always or for the first N of them (e.g. 403 AccessDenied on one key, 500 on a file list's first two
reads). Every injection is counted, and every request is logged with its time and fate (`log`).

Forwarding is `devtools.httpforward` (Host header unchanged, bodies buffered whole: a test tool).
"""
from __future__ import annotations

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
from urllib.parse import unquote

from devtools.httpforward import ServedInThread, Upstream, forward, read_body, relay, relay_head, s3_error

log = logging.getLogger(__name__)

Fault = Literal["slowdown", "reset", "reset_after", "damage", "latency", "truncate", "access_denied",
                "internal_error"]
KINDS: tuple[Fault, ...] = ("slowdown", "reset", "reset_after", "damage", "latency", "truncate", "access_denied",
                            "internal_error")

_ERRORS = {  # fault -> (status, S3 error code, message)
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "access_denied": (403, "AccessDenied", "Access Denied"),
    "internal_error": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass(frozen=True)
class Rule:
    """A fault for requests whose decoded path contains `path_contains` (e.g. "/bucket/key") and
    whose method is in `methods` (empty: any method): for every such request, or with `times` for
    the first `times` of them only."""

    fault: Fault
    path_contains: str
    methods: tuple[str, ...] = ()
    times: int = 0  # 0: always

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method in self.methods) and self.path_contains in path


@dataclass
class FaultPlan:
    """Rates are probabilities per request, checked in this order: reset, reset_after, damage
    (requests with a body), slowdown, then (after forwarding) truncate; latency is independent and
    adds `latency_s` before forwarding."""

    slowdown: float = 0.0
    reset: float = 0.0
    reset_after: float = 0.0
    damage: float = 0.0
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
        self.upstream = Upstream.parse(upstream)
        self.plan = plan or FaultPlan()
        self.counts: Counter[str] = Counter()  # injected faults by kind, plus "requests"
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, decoded path) of every request
        self.log: list[tuple[float, str, str, str]] = []  # (time, method, path, fault or "ok") per request
        self._rule_hits: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._rng = random.Random(self.plan.seed)
        self._served = ServedInThread(ThreadingHTTPServer((host, port), _handler_for(self)), "faultproxy")

    @property
    def url(self) -> str:
        return self._served.url

    def start(self) -> FaultProxy:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()

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

    def _rule(self, method: str, path: str, truncate: bool) -> Fault | None:
        """The first matching rule with tries left (counted), or None."""
        with self._lock:
            for i, r in enumerate(self.plan.rules):
                if (r.fault == "truncate") != truncate or not r.matches(method, path):
                    continue
                if r.times and self._rule_hits[i] >= r.times:
                    continue
                self._rule_hits[i] += 1
                return r.fault
        return None

    def decide_before(self, method: str, path: str, body_len: int = 0) -> Fault | None:
        rule = self._rule(method, path, truncate=False)
        if rule is not None:
            return rule
        if self._roll(self.plan.reset, method):
            return "reset"
        if self._roll(self.plan.reset_after, method):
            return "reset_after"
        if body_len and self._roll(self.plan.damage, method):
            return "damage"
        if self._roll(self.plan.slowdown, method):
            return "slowdown"
        return None

    def decide_truncate(self, method: str, path: str, body_len: int) -> bool:
        if method == "HEAD" or body_len < self.plan.truncate_min_bytes:
            return False
        if self._rule(method, path, truncate=True) is not None:
            return True
        return self._roll(self.plan.truncate, method)

    def _logged(self, method: str, path: str, fate: str) -> None:
        with self._lock:
            self.log.append((time.time(), method, path, fate))

    def requests_to(self, path_contains: str, method: str | None = None) -> list[tuple[float, str, str, str]]:
        """The logged requests whose path contains `path_contains` (and of `method`), in order."""
        with self._lock:
            return [x for x in self.log if path_contains in x[2] and (method is None or x[1] == method)]


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint

        def log_message(self, fmt: str, *args: object) -> None:  # quiet; counts tell the story
            log.debug("faultproxy: " + fmt, *args)

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _error(self, fault: Fault) -> None:
            status, code, msg = _ERRORS[fault]
            s3_error(self, status, code, msg, request_id="faultproxy")

        def _handle(self) -> None:
            proxy._count("requests")
            method, path = self.command, unquote(self.path.split("?")[0])
            with proxy._lock:
                proxy.requests[(method, path)] += 1
            body = read_body(self)
            fault = proxy.decide_before(method, path, len(body))
            proxy._logged(method, path, fault or "ok")
            if fault == "reset":
                proxy._count("reset")
                self._reset()
                return
            if fault in _ERRORS:
                proxy._count(fault)  # type: ignore[arg-type]
                self._error(fault)  # type: ignore[arg-type]
                return
            if fault == "damage":  # one byte flipped in the middle: what a bad NIC or middlebox does
                proxy._count("damage")
                i = len(body) // 2
                body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
            if proxy._roll(proxy.plan.latency, method):
                proxy._count("latency")
                time.sleep(proxy.plan.latency_s)
            ans = forward(proxy.upstream, method, self.path, self.headers.items(), body)
            if fault == "reset_after":  # applied upstream; the client never hears of it
                proxy._count("reset_after")
                self._reset()
                return
            if not proxy.decide_truncate(method, path, len(ans.body)):
                relay(self, ans)
                return
            proxy._count("truncate")
            relay_head(self, ans)
            self.wfile.write(ans.body[: len(ans.body) // 2])
            self.wfile.flush()
            self._reset()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

    return Handler
