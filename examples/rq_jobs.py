"""RQ jobs run by zygote workers: the worker's zygote imports this module,
and numpy and pandas with it, once; every job runs in a fresh fork of that
process, with nothing left to import.

From the repository root, with a Redis server on localhost:6379:

    pip install -e '.[rq]'
    pip install numpy pandas            # what the jobs use
    python -m examples.rq_jobs          # enqueues a few jobs, prints their results
    ZYGOTE_PRELOAD=examples.rq_jobs rq worker -w zygote_rq.ZygoteWorker --burst

Run the two last commands in two shells: the first waits up to a minute for
the worker to run its jobs. `$REDIS_URL` picks another Redis (give the
worker the same with `--url`). The zygote warns about the thread numpy's
OpenBLAS starts on import; it is harmless (numpy stops it at fork), and
`ZYGOTE_ALLOW_THREADS=examples.rq_jobs` says so.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

#: The process that imported this module: the zygote, in a zygote worker.
IMPORTED_IN = os.getpid()


def matrix_stats(n: int, seed: int = 0) -> dict[str, float]:
    """Statistics of a random symmetric n x n matrix (numpy is preloaded)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    eigenvalues = np.linalg.eigvalsh(a + a.T)
    return {
        "largest_eigenvalue": float(eigenvalues[-1]),
        "frobenius_norm": float(np.linalg.norm(a)),
    }


def daily_totals(days: int, seed: int = 0) -> dict[str, float]:
    """Per-weekday totals of a random series of sales (pandas is preloaded)."""
    rng = np.random.default_rng(seed)
    index = pd.date_range("2024-01-01", periods=days, freq="D")
    sales = pd.Series(rng.gamma(2.0, 50.0, days), index=index)
    totals = sales.groupby(sales.index.day_name()).sum().round(2)
    return {str(day): float(total) for day, total in totals.items()}


def where_am_i() -> dict[str, Any]:
    """Which process runs the job, and whether its code came preloaded."""
    return {
        "pid": os.getpid(),
        "parent": os.getppid(),
        "preloaded": os.getppid() == IMPORTED_IN,  # imported by the zygote, our parent
    }


def main() -> None:
    from redis import Redis
    from rq import Queue
    from rq.job import JobStatus

    connection = Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    queue = Queue(connection=connection)  # "default", where `rq worker` listens
    # By name: run as a script, this module is __main__, which a worker cannot import.
    jobs = [queue.enqueue("examples.rq_jobs.matrix_stats", n, seed=n) for n in (100, 200, 400)]
    jobs.append(queue.enqueue("examples.rq_jobs.daily_totals", 90))
    jobs.append(queue.enqueue("examples.rq_jobs.where_am_i"))
    print(f"enqueued {len(jobs)} jobs on {queue.name!r}, waiting for a worker...")

    deadline = time.monotonic() + 60
    ended = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
    for job in jobs:
        while (status := job.get_status(refresh=True)) not in ended:
            if time.monotonic() > deadline:
                sys.exit("no results within 60 s: is a worker running?")
            time.sleep(0.1)
        outcome = job.return_value() if status == JobStatus.FINISHED else status.value
        print(f"{job.get_call_string()} -> {outcome}")


if __name__ == "__main__":
    main()
