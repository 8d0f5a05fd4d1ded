"""Preload: a module that starts a thread at import, as telemetry clients
do. Under --thread-policy defer the thread starts in each worker instead."""

from __future__ import annotations

import os
import threading
import time

ticks: list[int] = []


def _tick() -> None:
    while True:
        ticks.append(os.getpid())
        time.sleep(0.005)


threading.Thread(target=_tick, name="ticker", daemon=True).start()


def ticker_runs_here() -> dict[str, object]:
    """In a worker: is the ticker alive, and ticking in this process?"""
    deadline = time.monotonic() + 5
    while os.getpid() not in ticks and time.monotonic() < deadline:
        time.sleep(0.005)
    names = [t.name for t in threading.enumerate()]
    return {"ticking": os.getpid() in ticks, "tickers": names.count("ticker")}


def otel_processor_threads() -> int:
    """With examples.opentelemetry_tasks preloaded: OpenTelemetry's export threads here."""
    return sum(t.name.startswith("OtelBatch") for t in threading.enumerate())


def sentry_transport_threads() -> int:
    """With examples.sentry_tasks preloaded: report, then count its threads."""
    import sentry_sdk

    sentry_sdk.capture_message("counting")
    return sum(t.name == "sentry-sdk.BackgroundWorker" for t in threading.enumerate())
