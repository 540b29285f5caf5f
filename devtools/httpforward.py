"""HTTP forwarding for the dev proxies in front of S3 endpoints (fault injection, notifications).

A request is read whole, sent upstream with its Host header unchanged (so SigV4 signatures made for
the proxy's address verify upstream) and the answer relayed. Bodies are buffered: these are test
tools for small objects, not production proxies.
"""
from __future__ import annotations

import http.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
       "expect"}  # botocore never signs Expect; the proxy answers 100-continue itself


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Upstream:
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {url!r}")
        return cls(u.hostname, u.port or 80)


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


def read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body, plain or chunked."""
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    n = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(n) if n else b""


def forward(up: Upstream, method: str, path: str, headers: Mapping[str, str] | Sequence[tuple[str, str]],
            body: bytes) -> Answer:
    """Send one request upstream (hop-by-hop headers dropped, Content-Length set) and read the answer."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    hdrs = [(k, v) for k, v in items if k.lower() not in HOP and k.lower() != "content-length"]
    if body or method in ("PUT", "POST"):
        hdrs.append(("Content-Length", str(len(body))))
    conn = http.client.HTTPConnection(up.host, up.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in hdrs:
            conn.putheader(k, v)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return Answer(resp.status, resp.reason, resp.getheaders(), resp.read())
    finally:
        conn.close()


def relay_head(h: BaseHTTPRequestHandler, ans: Answer, *, extra: Sequence[tuple[str, str]] = ()) -> None:
    """Status and headers of `ans` (a HEAD's Content-Length is the object's size: passed on as is)."""
    h.send_response(ans.status, ans.reason)
    for k, v in ans.headers:
        if k.lower() not in HOP and (h.command == "HEAD" or k.lower() != "content-length"):
            h.send_header(k, v)
    for k, v in extra:
        h.send_header(k, v)
    if h.command != "HEAD":
        h.send_header("Content-Length", str(len(ans.body)))
    h.end_headers()


def relay(h: BaseHTTPRequestHandler, ans: Answer, *, extra: Sequence[tuple[str, str]] = ()) -> None:
    relay_head(h, ans, extra=extra)
    if h.command != "HEAD":
        h.wfile.write(ans.body)


def s3_error(h: BaseHTTPRequestHandler, status: int, code: str, message: str, *, request_id: str = "proxy") -> None:
    """An S3 error answer with its XML body."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{h.path.split('?')[0]}</Resource><RequestId>{request_id}</RequestId></Error>").encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


class ServedInThread:
    """A proxy's HTTP server and the thread that serves it (`url`, `start`, `stop`)."""

    def __init__(self, server: ThreadingHTTPServer, name: str) -> None:
        self.server = server
        self.server.daemon_threads = True
        self._name = name
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
