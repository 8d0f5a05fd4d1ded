"""Telemetry from short-lived workers, with the real libraries: the
before_exit recipes for OpenTelemetry and sentry-sdk deliver every task's
spans and events to a local collector."""

from __future__ import annotations

from .collector import Collector
from .conftest import wait_until


def test_opentelemetry_spans_of_every_task_arrive(start_server, collector: Collector) -> None:
    server = start_server(preload=("examples.opentelemetry_tasks",), env=collector.env())
    client = server.client(timeout=60)
    assert list(client.map("examples.opentelemetry_tasks:traced", range(40))) == list(range(40))
    wait_until(lambda: len(collector.spans) >= 40, timeout=15, what="40 spans")
    assert collector.spans == ["task"] * 40
    assert server.stats()["failed_starts"] == 0


def test_sentry_events_of_every_task_arrive(start_server, collector: Collector) -> None:
    server = start_server(preload=("examples.sentry_tasks",), env=collector.env())
    client = server.client(timeout=60)
    assert list(client.map("examples.sentry_tasks:report", range(40))) == list(range(40))
    wait_until(lambda: len(collector.events) >= 40, timeout=15, what="40 events")
    assert sorted(collector.events) == sorted(f"task {i}" for i in range(40))
