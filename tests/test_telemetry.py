"""Telemetry from short-lived workers, with the real libraries: the
before_exit recipes for OpenTelemetry and sentry-sdk deliver every task's
spans and events to a local collector."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import zlib
from collections.abc import Iterator

import pytest

from .conftest import wait_until


class Collector(http.server.ThreadingHTTPServer):
    """Counts OTLP spans and Sentry events posted to it."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[str] = []
        self.events: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.path == "/v1/traces":
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                ExportTraceServiceRequest,
            )

            request = ExportTraceServiceRequest.FromString(body)
            names = [
                span.name
                for resource in request.resource_spans
                for scope in resource.scope_spans
                for span in scope.spans
            ]
            with self.server.lock:
                self.server.spans += names
        elif self.path.startswith("/api/1/envelope"):
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
            messages = [item["message"] for item in items if "message" in item]
            with self.server.lock:
                self.server.events += messages
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_opentelemetry_spans_of_every_task_arrive(start_server, collector) -> None:
    server = start_server(preload=("tests.otel_app",), env={"ZYGOTE_TEST_COLLECTOR": collector.url})
    client = server.client(timeout=60)
    assert list(client.map("tests.otel_app:traced", range(40))) == list(range(40))
    wait_until(lambda: len(collector.spans) >= 40, timeout=15, what="40 spans")
    assert collector.spans == ["task"] * 40
    assert server.stats()["failed_starts"] == 0


def test_sentry_events_of_every_task_arrive(start_server, collector) -> None:
    server = start_server(
        preload=("tests.sentry_app",), env={"ZYGOTE_TEST_COLLECTOR": collector.url}
    )
    client = server.client(timeout=60)
    assert list(client.map("tests.sentry_app:report", range(40))) == list(range(40))
    wait_until(lambda: len(collector.events) >= 40, timeout=15, what="40 events")
    assert sorted(collector.events) == sorted(f"task {i}" for i in range(40))
