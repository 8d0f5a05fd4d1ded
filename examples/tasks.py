"""Small tasks for trying zygote out: `zygote start --preload examples.tasks`."""

from __future__ import annotations

import os
import time


def add(a: float, b: float) -> float:
    return a + b


def whoami() -> dict[str, int]:
    """The worker's pid and its parent (the zygote, or the supervisor once
    the zygote that forked it is gone)."""
    return {"pid": os.getpid(), "ppid": os.getppid()}


def slow_square(x: float, seconds: float = 0.1) -> float:
    time.sleep(seconds)
    return x * x


def fail(message: str = "something went wrong") -> None:
    raise RuntimeError(message)
