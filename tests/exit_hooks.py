"""Preload: before_exit hooks. One records that it ran after the task (as a
telemetry flush would); with $ZYGOTE_TEST_EXIT_HANG set, a second one hangs,
either in Python (``sleep``) or where no signal reaches it (``blocked``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import zygote

DIR = Path(os.environ.get("ZYGOTE_TEST_DIR", "/tmp"))
HANG = os.environ.get("ZYGOTE_TEST_EXIT_HANG", "")
_done: list[str] = []


def work(job: str) -> str:
    _done.append(job)
    return job


@zygote.before_exit
def flush() -> None:
    time.sleep(0.05)  # an export to a collector, say
    (DIR / f"flushed-{os.getpid()}").write_text(",".join(_done))


@zygote.before_exit
def hang() -> None:
    if HANG == "sleep":
        time.sleep(3600)
    elif HANG == "blocked":
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(3600)


@zygote.before_exit
def after_the_hang() -> None:
    (DIR / f"after-{os.getpid()}").write_text("ran")
