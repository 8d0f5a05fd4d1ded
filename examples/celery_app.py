"""Celery on zygote: every task in a fresh fork of a zygote that imported
numpy and pandas once.

    .venv/bin/pip install -e '.[celery]'
    CELERY_CUSTOM_WORKER_POOL=zygote_celery:ZygotePool \\
        .venv/bin/celery -A examples.celery_app worker -P custom -c 4
    .venv/bin/python -m examples.celery_app      # in another shell

The broker and the result backend default to the local Redis
(`CELERY_BROKER_URL`, `CELERY_RESULT_BACKEND` to change them). The pool
starts its own zygote server preloading this module (the worker's `-A`)
plus `$ZYGOTE_PRELOAD`; with `ZYGOTE_ENDPOINT` set it uses that server.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
from celery import Celery

app = Celery(
    "examples.celery_app",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)


@app.task
def column_stats(seed: int) -> dict[str, float]:
    """Some pandas work on random data; pandas was imported by the zygote."""
    frame = pd.DataFrame(np.random.default_rng(seed).normal(size=(1000, 3)), columns=list("abc"))
    return {k: round(float(v), 4) for k, v in frame.mean().items()}


@app.task
def fails(message: str) -> None:
    raise ValueError(message)


@app.task
def where() -> int:
    """The process the task ran in: a new one every time."""
    return os.getpid()


def main() -> int:
    print("pids:", sorted(r.get(timeout=30) for r in [where.delay() for _ in range(4)]))
    print("stats:", column_stats.delay(1).get(timeout=30))
    try:
        fails.delay("an error, with its traceback from the worker").get(timeout=30)
    except ValueError as exc:
        print("raised:", repr(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
