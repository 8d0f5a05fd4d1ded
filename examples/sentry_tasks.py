"""sentry-sdk in one-task workers: every task's event reaches Sentry.

    SENTRY_DSN=https://key@o0.ingest.sentry.io/0 \\
        zygote start --thread-policy defer --preload examples.sentry_tasks
    zygote spawn examples.sentry_tasks:report 1

sentry-sdk starts its transport thread on first use, so the zygote has none
as long as the preload reports nothing; each worker starts its own, and the
`before_exit` hook flushes it before the worker ends: without it, about 60%
of short tasks' events were lost here. (`--thread-policy defer` keeps the
zygote thread-free even if the preload does report an event — but that
event then waits in the zygote's queue, and every worker sends it again:
report nothing while preloading.) Needs `pip install sentry-sdk`.
"""

from __future__ import annotations

import sentry_sdk

import zygote

sentry_sdk.init(default_integrations=False)  # the DSN comes from $SENTRY_DSN


@zygote.before_exit
def flush_events() -> None:
    sentry_sdk.flush(timeout=1.5)


def report(job: int) -> int:
    """A task that reports something."""
    sentry_sdk.capture_message(f"task {job}")
    return job
