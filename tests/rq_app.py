"""RQ jobs for tests/test_rq.py, preloaded by the workers' zygote
(ZYGOTE_PRELOAD=tests.rq_app)."""

from __future__ import annotations

import os
import time
from typing import Any

from redis import Redis
from rq import get_current_job
from zygote_rq import ZygoteWorker

#: The process that imported this module: the zygote, for a zygote worker.
IMPORTED_IN = os.getpid()


def add(a: int, b: int) -> int:
    return a + b


def whoami() -> dict[str, Any]:
    """Where the job runs, and where its module was imported."""
    return {"pid": os.getpid(), "ppid": os.getppid(), "imported_in": IMPORTED_IN}


def fail(message: str) -> None:
    print(f"failing with {message}")  # to the rq worker's output, like a forked horse's
    raise ValueError(message)


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def sleep_reporting_pid(seconds: float) -> str:
    """Sleep; the horse's pid goes to job.meta first, for a test to kill it."""
    job = get_current_job()
    assert job is not None
    job.meta["pid"] = os.getpid()
    job.save_meta()
    time.sleep(seconds)
    return "slept"


def unpicklable() -> Any:
    return lambda: None


def on_success(job: Any, connection: Redis, result: Any) -> None:
    connection.rpush(f"{job.origin}:callbacks", f"success {job.id} {result}")
    connection.rpush(f"{job.origin}:callback-pids", os.getpid())


def on_failure(job: Any, connection: Redis, exc_type: type, exc: Exception, tb: Any) -> None:
    connection.rpush(f"{job.origin}:callbacks", f"failure {job.id} {exc_type.__name__}: {exc}")


class NoHorseWorker(ZygoteWorker):
    """Its horses fail before RQ's code runs: their task does not exist."""

    horse_task = "tests.rq_app:no_such_horse"
