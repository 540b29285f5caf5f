"""A small HTTP server for /metrics, /healthz and /readyz (Kubernetes probes, Prometheus scrape).

Runs in a daemon thread beside the process's own loop; the dashboard adds its pages through
``extra_routes``. It binds only to the host it is given (127.0.0.1 unless told otherwise). On any
address other than loopback it needs a token, and then every path but the two probes answers 401
unless the request carries it: ``Authorization: Bearer <token>`` (Prometheus' ``authorization``,
curl), or HTTP Basic with the token as the password (a browser asks for it; the user is ignored).

- /metrics  Prometheus text format (OpenMetrics when the scraper asks for it)
- /healthz  200 while ``live()`` is true (the process loop is alive), else 503
- /readyz   200 while ``ready()`` is true (e.g. consumer joined, stores reachable), else 503
"""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from xdc.errors import ConfigError
from xdc.metrics import REGISTRY

log = logging.getLogger(__name__)

# path -> () -> (HTTP status, content type, body) or (..., {extra header: value}); a query route
# gets the query string's values
RouteHandler = Callable[[], "tuple[int, str, bytes] | tuple[int, str, bytes, dict[str, str]]"]
QueryHandler = Callable[[dict[str, str]], "tuple[int, str, bytes] | tuple[int, str, bytes, dict[str, str]]"]
Probe = Callable[[], bool]

BUILTIN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes say ok / not ok and nothing else
_TEXT = "text/plain; charset=utf-8"
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """ConfigError unless `host` is loopback or a token guards it."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the token for {host} is shorter than {MIN_TOKEN_CHARS} characters")
    if token is None and not is_loopback(host):
        raise ConfigError(f"refusing to serve on {host} without a token: anyone who reaches it could read the "
                          "metrics and the dashboard. Bind 127.0.0.1, or set a token (metrics.token_env)")


def authorized(header: str | None, token: str) -> bool:
    """Does an Authorization header carry the token (Bearer, or Basic with it as the password)?"""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), token.encode())


@dataclass
class ServerHandle:
    """A running server: where it listens and how to stop it."""

    host: str
    port: int
    _server: ThreadingHTTPServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _probe(check: Probe | None, name: str) -> tuple[int, str, bytes]:
    if check is None:
        return 200, _TEXT, b"ok\n"
    try:
        ok = bool(check())
    except Exception:  # a probe that raises means "not ok", never a 500 with a traceback
        log.exception("%s check raised", name)
        ok = False
    return (200, _TEXT, b"ok\n") if ok else (503, _TEXT, f"not {name}\n".encode())


def _make_handler(registry: CollectorRegistry, ready: Probe | None, live: Probe | None,
                  routes: dict[str, RouteHandler], query_routes: dict[str, QueryHandler],
                  token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "xdc"
        timeout = 30  # a stalled client must not hold a thread forever

        def _respond(self, head_only: bool) -> None:
            url = urlsplit(self.path)
            path = url.path
            extra: list[tuple[str, str]] = []
            try:
                if token is not None and path not in OPEN_PATHS and \
                        not authorized(self.headers.get("Authorization"), token):
                    status, content_type, body = 401, _TEXT, b"unauthorized\n"
                    extra.append(("WWW-Authenticate", 'Basic realm="xdc", charset="UTF-8"'))
                elif path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    status, body = 200, encoder(registry)
                elif path == "/healthz":
                    status, content_type, body = _probe(live, "live")
                elif path == "/readyz":
                    status, content_type, body = _probe(ready, "ready")
                elif path in routes:
                    status, content_type, body, *more = routes[path]()
                    extra += list(more[0].items()) if more else []
                elif path in query_routes:
                    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                    status, content_type, body, *more = query_routes[path](query)
                    extra += list(more[0].items()) if more else []
                else:
                    status, content_type, body = 404, _TEXT, b"not found\n"
            except Exception:
                log.exception("handler for %s failed", path)
                status, content_type, body = 500, _TEXT, b"internal error\n"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if not any(k == "Content-Security-Policy" for k, _ in extra):  # nothing here is a page to run
                self.send_header("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._respond(head_only=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond(head_only=True)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            # Probes hit every few seconds: keep them out of the process's stderr.
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def serve(host: str = "127.0.0.1", port: int = 0, registry: CollectorRegistry | None = None,
          ready: Probe | None = None, extra_routes: dict[str, RouteHandler] | None = None,
          live: Probe | None = None, token: str | None = None,
          query_routes: dict[str, QueryHandler] | None = None) -> ServerHandle:
    """Start serving in a daemon thread and return at once; ``port=0`` picks a free port.

    ``ready``/``live`` default to "always" when not given. ``extra_routes`` may not replace the
    built-in paths. ``token``: required on any host but loopback (ConfigError otherwise); with it,
    every path but /healthz and /readyz needs it. Raises ConfigError if the address cannot be bound.
    """
    check_exposure(host, token)
    routes = dict(extra_routes or {})
    clash = BUILTIN_PATHS & (routes.keys() | (query_routes or {}).keys())
    if clash:
        raise ConfigError(f"extra_routes may not replace built-in paths: {sorted(clash)}")
    handler = _make_handler(registry if registry is not None else REGISTRY, ready, live, routes,
                            dict(query_routes or {}), token)

    server_cls = type("XdcHTTPServer", (ThreadingHTTPServer,), {
        "daemon_threads": True,
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
    })
    try:
        server = server_cls((host, port), handler)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    bound_port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"xdc-http-{bound_port}", daemon=True)
    thread.start()
    log.info("serving /metrics /healthz /readyz on %s:%d%s", host, bound_port, " (token required)" if token else "")
    return ServerHandle(host=host, port=bound_port, _server=server, _thread=thread)
