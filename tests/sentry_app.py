"""Preload: sentry-sdk as the recipe in docs/fork-safety.md sets it up, with
a DSN pointing at $ZYGOTE_TEST_COLLECTOR, and a before_exit hook that
flushes each worker's events."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import sentry_sdk

import zygote

_collector = urlsplit(os.environ["ZYGOTE_TEST_COLLECTOR"])
sentry_sdk.init(dsn=f"http://public@{_collector.netloc}/1", default_integrations=False)

if os.environ.get("ZYGOTE_TEST_FLUSH", "1") == "1":

    @zygote.before_exit
    def flush_events() -> None:
        sentry_sdk.flush(timeout=1.5)


def report(job: int) -> int:
    sentry_sdk.capture_message(f"task {job}")
    return job
