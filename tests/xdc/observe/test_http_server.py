"""xdc.observe.http: real HTTP requests with urllib against a server on a free port."""
from __future__ import annotations

import base64
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xdc.errors import ConfigError
from xdc.metrics import Metrics, new_registry
from xdc.observe.http import ServerHandle, is_loopback, serve


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


class Flag:
    def __init__(self, value: bool) -> None:
        self.value = value

    def __call__(self) -> bool:
        return self.value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(new_registry())


@pytest.fixture
def flags() -> tuple[Flag, Flag]:
    return Flag(True), Flag(False)


@pytest.fixture
def server(metrics: Metrics, flags: tuple[Flag, Flag]) -> Iterator[ServerHandle]:
    live, ready = flags
    routes = {
        "/dash": lambda: (200, "text/html; charset=utf-8", b"<h1>lag</h1>"),
        "/boom": lambda: 1 / 0,
    }
    handle = serve("127.0.0.1", 0, metrics.registry, ready=ready, extra_routes=routes, live=live)
    try:
        yield handle
    finally:
        handle.stop()


def test_binds_the_given_host_on_a_free_port(server: ServerHandle) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server._server.server_address[0] == "127.0.0.1"


def test_metrics_in_prometheus_text_format(server: ServerHandle, metrics: Metrics) -> None:
    metrics.replication_lag_seconds.labels("r1", "idc-a", "idc-b").observe(3.0)
    metrics.events_applied_total.labels("r1", "put").inc()
    metrics.bytes_copied_total.labels("r1").inc(7)
    metrics.set_consumer_lag("g", "s3-events", 0, highwater=5, committed=2)
    status, headers, body = get(server.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples[("xdc_events_applied_total", (("op", "put"), ("route", "r1")))] == 1
    assert samples[("xdc_bytes_copied_total", (("route", "r1"),))] == 7
    assert samples[("xdc_consumer_lag_messages", (("group", "g"), ("partition", "0"), ("topic", "s3-events")))] == 3
    assert samples[("xdc_replication_lag_seconds_count",
                    (("route", "r1"), ("source_dc", "idc-a"), ("target_dc", "idc-b")))] == 1
    # The server shows only its own registry: no process_* / python_* collectors of the global one.
    assert b"python_info" not in body


def test_metrics_openmetrics_when_asked(server: ServerHandle) -> None:
    status, headers, body = get(server.url + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_healthz_follows_live(server: ServerHandle, flags: tuple[Flag, Flag]) -> None:
    live, _ = flags
    assert get(server.url + "/healthz")[0] == 200
    live.value = False
    status, _, body = get(server.url + "/healthz")
    assert status == 503 and body == b"not live\n"


def test_readyz_follows_ready(server: ServerHandle, flags: tuple[Flag, Flag]) -> None:
    _, ready = flags
    assert get(server.url + "/readyz")[0] == 503
    ready.value = True
    status, _, body = get(server.url + "/readyz?verbose=1")  # query strings are ignored
    assert status == 200 and body == b"ok\n"


def test_probe_that_raises_is_not_ok(metrics: Metrics) -> None:
    def broken() -> bool:
        raise RuntimeError("db gone")

    handle = serve(registry=metrics.registry, ready=broken)
    try:
        assert get(handle.url + "/readyz")[0] == 503
        assert get(handle.url + "/healthz")[0] == 200  # no live check given: always live
    finally:
        handle.stop()


def test_extra_routes_unknown_paths_and_errors(server: ServerHandle) -> None:
    status, headers, body = get(server.url + "/dash")
    assert (status, headers["Content-Type"], body) == (200, "text/html; charset=utf-8", b"<h1>lag</h1>")
    assert get(server.url + "/nope")[0] == 404
    status, _, body = get(server.url + "/boom")
    assert status == 500 and b"ZeroDivision" not in body


def test_head_has_no_body(server: ServerHandle) -> None:
    status, headers, body = get(server.url + "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_concurrent_scrapes(server: ServerHandle, metrics: Metrics) -> None:
    metrics.dead_letters_total.labels("t", "r").inc()
    results: list[int] = []

    def scrape() -> None:
        results.append(get(server.url + "/metrics")[0])

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8


def test_extra_routes_may_not_shadow_builtins(metrics: Metrics) -> None:
    with pytest.raises(ConfigError, match="/metrics"):
        serve(registry=metrics.registry, extra_routes={"/metrics": lambda: (200, "text/plain", b"")})


def test_port_in_use_is_a_config_error(server: ServerHandle, metrics: Metrics) -> None:
    with pytest.raises(ConfigError, match="cannot listen"):
        serve("127.0.0.1", server.port, metrics.registry)


def test_stop_frees_the_port_and_is_idempotent(metrics: Metrics) -> None:
    handle = serve(registry=metrics.registry)
    port = handle.port
    with handle:
        assert get(handle.url + "/healthz")[0] == 200
    handle.stop()
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))


# -- exposure: loopback, or a token ---------------------------------------------------------------
TOKEN = "t0ken-for-the-test-0123456789"


def test_refuses_a_non_loopback_host_without_a_token(metrics: Metrics) -> None:
    with pytest.raises(ConfigError, match="without a token"):
        serve("0.0.0.0", 0, metrics.registry)


def test_refuses_a_short_token(metrics: Metrics) -> None:
    with pytest.raises(ConfigError, match="shorter than"):
        serve("127.0.0.1", 0, metrics.registry, token="short")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.org"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


@pytest.fixture
def guarded(metrics: Metrics) -> Iterator[ServerHandle]:
    routes = {"/dash": lambda: (200, "text/html; charset=utf-8", b"<h1>lag</h1>")}
    handle = serve("127.0.0.1", 0, metrics.registry, extra_routes=routes, token=TOKEN)
    try:
        yield handle
    finally:
        handle.stop()


def test_a_token_guards_metrics_and_pages_not_the_probes(guarded: ServerHandle) -> None:
    base = guarded.url
    for path in ("/metrics", "/dash", "/nowhere"):
        status, headers, body = get(base + path)
        assert status == 401 and b"xdc_" not in body and b"lag" not in body, (path, status, body)
        assert headers["WWW-Authenticate"].startswith("Basic")
        assert get(base + path, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    for path in ("/healthz", "/readyz"):
        assert get(base + path)[0] == 200
    assert get(base + "/metrics", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    status, _, body = get(base + "/dash", {"Authorization": f"Basic {basic}"})
    assert (status, body) == (200, b"<h1>lag</h1>")
    assert get(base + "/dash", {"Authorization": "Basic !!not-base64"})[0] == 401


def test_responses_forbid_sniffing_and_scripts(server: ServerHandle) -> None:
    status, headers, _ = get(server.url + "/dash")
    assert status == 200
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
