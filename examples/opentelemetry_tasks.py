"""OpenTelemetry in one-task workers: every task's span reaches the collector.

    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:4318/v1/traces \\
        zygote start --thread-policy defer --preload examples.opentelemetry_tasks
    zygote spawn examples.opentelemetry_tasks:traced 1

The batch span processor starts its export thread when it is made — here, in
the zygote, at import. `--thread-policy defer` keeps that thread out of the
zygote (the SDK starts one in each worker by itself, from its at-fork hook),
and the `before_exit` hook flushes a worker's spans before it ends: without
it, a short task's spans die with the worker (0 of 400 arrived here).
Needs `pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http`.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import zygote

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer(__name__)


@zygote.before_exit
def flush_spans() -> None:
    provider.force_flush(timeout_millis=1500)


def traced(job: int) -> int:
    """A task with a span of its own."""
    with tracer.start_as_current_span("task") as span:
        span.set_attribute("job", job)
    return job
