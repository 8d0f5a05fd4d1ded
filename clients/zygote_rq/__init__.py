"""RQ integration: every job runs in a fresh fork of a preloaded zygote.

    ZYGOTE_PRELOAD=myapp.jobs rq worker -w zygote_rq.ZygoteWorker

`ZygoteWorker` is RQ's `Worker` with one change: its work horse is not a
fork of the RQ worker but a zygote worker, a checked fork of a process that
imported `$ZYGOTE_PRELOAD` (comma-separated modules) once, up front. It
starts a private zygote server for that (`zygote.embedded`), or uses the
one at `$ZYGOTE_ENDPOINT`, which must be able to import `zygote_rq.horse`.
Heartbeats, job timeouts, stop-job, callbacks and the registries work as
with RQ's own worker: the horse performs the job as RQ's `perform_job`
does, and the worker records a success on its own connection.
"""

from __future__ import annotations

from .worker import HORSE_MODULE, ZygoteWorker

__all__ = ["HORSE_MODULE", "ZygoteWorker"]
