"""Exporters by config: the same spans reach an OTLP/HTTP collector and the built-in state sink.

The collector here is a small HTTP server on 127.0.0.1 that decodes what the real OTLP exporter
posts (protobuf ExportTraceServiceRequest, opentelemetry-proto), as any collector would.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from xdc import trace
from xdc.config import parse_config
from xdc.observe import telemetry
from xdc.topology import Topology


class Collector:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        got = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.paths.append(self.path)
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    res = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            got.spans.append({"name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                              "parent": s.parent_span_id.hex(), "resource": res,
                                              "attrs": {a.key: a.value.string_value for a in s.attributes}})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    try:
        yield c
    finally:
        c.stop()


def test_spans_reach_an_otlp_collector_and_the_state(collector: Collector, tmp_path: Path) -> None:
    cfg = parse_config({
        "datacenters": {dc: {"s3": {"internal_url": "http://127.0.0.1:1", "external_url": "http://127.0.0.1:1",
                                    "credentials": {"access_key_env": "NONE_A", "secret_key_env": "NONE_B"}},
                             "kafka": {"bootstrap_servers": ["127.0.0.1:1"]}, "state_url": f"sqlite:///{dc}.db"}
                        for dc in ("A", "B")},
        "tracing": {"sample_ratio": 1.0, "exporters": ["state", "otlp"], "otlp_endpoint": collector.url,
                    "export_interval_ms": 50}}, base_dir=tmp_path, dc="B")
    topo = Topology(cfg)
    with telemetry.start(topo, "mirror"):
        root = trace.root("ingest.object", attributes=trace.attrs(dc="A", key="idca-drive/k"))
        consumed = trace.entry("mirror.apply", trace.headers(root), attributes=trace.attrs(key="idcb-drive/k"))
        trace.end(consumed)
        trace.end(root)
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    by = {s["name"]: s for s in collector.spans}
    assert set(by) == {"ingest.object", "mirror.apply"}
    assert by["mirror.apply"]["parent"] == by["ingest.object"]["span_id"]
    assert by["mirror.apply"]["resource"]["xdc.component"] == "mirror" and by["mirror.apply"]["resource"]["xdc.dc"] == "B"
    assert by["ingest.object"]["attrs"]["xdc.key"] == "idca-drive/k"
    # the built-in sink kept each span in the state of the datacenter it happened in
    with Topology(cfg) as t:
        kept_b = t.site("B").state.traces.spans([by["mirror.apply"]["trace_id"]])
        kept_a = t.site("A").state.traces.spans([by["mirror.apply"]["trace_id"]])
    assert [(s["name"], s["span_id"]) for s in kept_b] == [("mirror.apply", by["mirror.apply"]["span_id"])]
    assert [(s["name"], s["span_id"]) for s in kept_a] == [("ingest.object", by["ingest.object"]["span_id"])]


def test_otlp_needs_an_endpoint() -> None:
    with pytest.raises(Exception, match="otlp_endpoint"):
        parse_config({"datacenters": {"A": {"s3": {"internal_url": "http://x:1", "external_url": "http://x:1",
                                                   "credentials": {"access_key_env": "A", "secret_key_env": "B"}},
                                            "kafka": {"bootstrap_servers": ["x:1"]}}},
                      "tracing": {"exporters": ["otlp"]}})
