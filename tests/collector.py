"""A local collector for telemetry tests: counts OTLP/HTTP spans and Sentry
events posted to it (decoded with the real libraries' formats)."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import zlib


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

    def env(self) -> dict[str, str]:
        """The libraries' own settings, pointing them here."""
        return {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{self.url}/v1/traces",
            "SENTRY_DSN": f"http://public@127.0.0.1:{self.server_address[1]}/1",
        }


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
