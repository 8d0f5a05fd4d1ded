"""Tasks the benchmarks run (preloaded with numpy and pandas)."""

from __future__ import annotations


def noop() -> None:
    return None


def echo(x: object) -> object:
    return x


def reply(conn: object) -> None:
    """A multiprocessing target: send None back through `conn`."""
    conn.send(None)  # type: ignore[attr-defined]


def preload_and_reply(conn: object) -> None:
    """A `spawn` target: import what the zygote preloads first, then reply."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401

    conn.send(None)  # type: ignore[attr-defined]


def wait_for(path: str, timeout: float = 300.0) -> None:
    """Stay alive until `path` exists: a worker that just occupies a slot."""
    import os
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
