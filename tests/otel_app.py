"""Preload: OpenTelemetry as the recipe in docs/fork-safety.md sets it up. A
batch span processor exporting over OTLP/HTTP to $ZYGOTE_TEST_COLLECTOR, and
a before_exit hook that flushes each worker's spans (without it, most of a
short task's spans die with the worker)."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import zygote

provider = TracerProvider()
provider.add_span_processor(
    BatchSpanProcessor(
        OTLPSpanExporter(endpoint=os.environ["ZYGOTE_TEST_COLLECTOR"] + "/v1/traces")
    )
)
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests.otel_app")

if os.environ.get("ZYGOTE_TEST_FLUSH", "1") == "1":

    @zygote.before_exit
    def flush_spans() -> None:
        provider.force_flush(timeout_millis=1500)


def traced(job: int) -> int:
    with tracer.start_as_current_span("task") as span:
        span.set_attribute("job", job)
    return job
