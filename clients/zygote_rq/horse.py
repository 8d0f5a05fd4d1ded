"""The work horse's side: runs in a fresh zygote worker, one RQ job each.

The zygote preloads this module, and with it RQ, redis-py and the worker
class, once. `run_job` then rebuilds from names and plain values what RQ's
forked horse inherits (a Redis connection, a worker of the same name, the
job as stored, its queue and execution) and performs the job as RQ's
perform_job does. The worker prepared the job before the spawn and records
a success after it, so a job that returns costs this process no
connection: the Redis client connects on its first command only (a
failure's bookkeeping, a callback or the job using it). Nothing here
touches the network at import time: the zygote must not hold connections
its children would share.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.driver_info import DriverInfo
from rq.executions import Execution
from rq.logutils import setup_loghandlers
from rq.utils import import_attribute, now, utcformat, utcparse

from .settings import Finished, HorseSettings
from .worker import ZygoteWorker

if TYPE_CHECKING:
    from rq.job import Job
    from rq.queue import Queue

__all__ = ["run_job"]

log = logging.getLogger("zygote.rq")


def run_job(
    job_id: str,
    execution: tuple[str, float],
    queue_name: str,
    worker_name: str,
    redis_kwargs: dict[str, Any],
    settings: HorseSettings,
    stored: dict[str, bytes],
) -> bool | Finished:
    """Perform RQ job `job_id` (its hash as `stored` in Redis) in this
    process, as worker `worker_name`'s work horse, for `execution` (its id
    and creation time): what ZygoteWorker.main_work_horse returns. Exits
    with status 1 if the job could not be loaded (the worker then fails it)."""
    try:
        worker, job, queue = _rebuild(
            job_id, execution, queue_name, worker_name, redis_kwargs, settings, stored
        )
    except Exception:
        log.exception("Worker %s: the work horse could not load job %s", worker_name, job_id)
        raise SystemExit(1) from None
    return worker.main_work_horse(job, queue)


def _rebuild(
    job_id: str,
    execution: tuple[str, float],
    queue_name: str,
    worker_name: str,
    redis_kwargs: dict[str, Any],
    settings: HorseSettings,
    stored: dict[str, bytes],
) -> tuple[ZygoteWorker, Job, Queue]:
    level, date_format, log_format = settings["logging"]
    for logger in ("rq.worker", "rq.job", "zygote.rq"):
        setup_loghandlers(level, date_format, log_format, name=logger)
    worker_class = import_attribute(settings["worker_class"])
    if not (isinstance(worker_class, type) and issubclass(worker_class, ZygoteWorker)):
        raise TypeError(f"{settings['worker_class']} is not a ZygoteWorker")
    worker = worker_class(
        settings["queues"],  # their number decides how RQ dequeues, so all of them
        name=worker_name,
        connection=Redis(**redis_kwargs, driver_info=DRIVER_INFO),
        job_class=settings["job_class"],
        queue_class=settings["queue_class"],
        serializer=settings["serializer"],
        exception_handlers=[import_attribute(path) for path in settings["exception_handlers"]],
        default_result_ttl=settings["default_result_ttl"],
        worker_ttl=settings["worker_ttl"],
        job_monitoring_interval=settings["job_monitoring_interval"],
        log_job_description=settings["log_job_description"],
        disable_default_exception_handler=settings["disable_default_exception_handler"],
        prepare_for_work=False,
    )
    job = worker.job_class(job_id, connection=worker.connection, serializer=worker.serializer)
    job.restore(stored)  # what Job.fetch does with the hash it reads
    queue = next((q for q in worker.queues if q.name == queue_name), None)
    if queue is None:
        queue = worker.queue_class(
            queue_name,
            connection=worker.connection,
            job_class=worker.job_class,
            serializer=worker.serializer,
            death_penalty_class=worker.death_penalty_class,
        )
    execution_id, created = execution
    worker.execution = Execution(execution_id, job_id, connection=worker.connection)
    worker.execution.created_at = datetime.fromtimestamp(created, tz=UTC)
    return worker, job, queue


#: redis-py looks its own version up in the installed packages' metadata
#: for every new connection unless given this: 4-8 ms in each fresh horse.
DRIVER_INFO = DriverInfo()


def _warm_up() -> None:
    """Pay here, once, for what redis-py and RQ otherwise import or cache on
    first use in every horse (measured: 20 of a horse's 40 ms)."""
    Redis()  # its connection pool and client name; it connects on first use only
    utcparse(utcformat(now()))  # _strptime, and the pattern of RQ's timestamps
    "localhost".encode("idna")  # what connecting to a host name encodes it with
    # The resolver's modules (NSS), loaded by a process's first lookup.
    with contextlib.suppress(OSError):
        socket.getaddrinfo("localhost", 6379, type=socket.SOCK_STREAM)


_warm_up()
