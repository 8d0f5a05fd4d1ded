"""Task module for benchmarks/queues.py: one small piece of numpy + pandas
work (about 1.5 ms in a warm process here), as a Celery task and as a plain
function for RQ.

numpy and pandas are imported at module level, as an application's task
module would: a zygote that preloads this module has them; RQ's default
worker, whose work horse imports the job's module after the fork, pays for
them in every job. The Celery app's broker and result backend are Redis db 7.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import numpy as np
import pandas as pd
from celery import Celery

REDIS_URL = "redis://127.0.0.1:6379/7"
ROWS = 1000
SENSORS = 16

app = Celery("benchmarks.queues_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    # Results are read within seconds; keep db 7 from filling over many runs.
    result_expires=600,
)


def summarize(seed: int) -> dict[str, Any]:
    """The largest per-sensor mean, by magnitude, of a batch of random
    readings. Also returns where and when it ran (CLOCK_MONOTONIC is
    system-wide on Linux: the client compares the stamps with its own) and
    the minor page faults it took (copy-on-write, in a fresh fork)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    readings = pd.DataFrame(
        {"sensor": rng.integers(0, SENSORS, ROWS), "value": rng.normal(size=ROWS)}
    )
    value = float(readings.groupby("sensor")["value"].mean().abs().max())
    ended = time.monotonic()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {
        "value": value,
        "pid": os.getpid(),
        "started": started,
        "ended": ended,
        "faults": faults,
    }


@app.task(name="benchmarks.queues_app.summarize")
def summarize_task(seed: int) -> dict[str, Any]:
    """`summarize` as a Celery task."""
    return summarize(seed)
