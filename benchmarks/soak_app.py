"""Tasks the soak run (benchmarks/soak.py) spawns. Each one first appends its
job id to the file named by $ZYGOTE_SOAK_MARKER, so that a job run twice
shows up as a duplicate line."""

from __future__ import annotations

import os
import sys
import time


def _mark(job: str) -> None:
    path = os.environ.get("ZYGOTE_SOAK_MARKER")
    if path:
        # One write(2) of a short line with O_APPEND: lines never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{job}\n".encode())
        finally:
            os.close(fd)


def short(job: str, x: int) -> int:
    _mark(job)
    return x * 2


def fail(job: str, how: str) -> None:
    """Fail one way or another: raise, sys.exit(3), or os._exit(7)."""
    _mark(job)
    if how == "raise":
        raise ValueError(f"job {job} fails on purpose")
    if how == "exit":
        sys.exit(3)
    os._exit(7)


def slow(job: str, seconds: float) -> str:
    _mark(job)
    time.sleep(seconds)
    return job


def big(job: str, data: bytes) -> int:
    """A payload near the server's message limit in, its length out."""
    _mark(job)
    return len(data)


def big_result(job: str, size: int) -> bytes:
    """A result of `size` bytes (over the limit: the job raises)."""
    _mark(job)
    return b"r" * size


def square(item: list[object]) -> int:
    """For map(): `item` is [job id, x]."""
    job, x = item
    _mark(str(job))
    assert isinstance(x, int)
    return x**2
