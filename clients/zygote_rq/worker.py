"""`ZygoteWorker`: an RQ worker whose work horse is a zygote worker.

RQ's `Worker` forks itself for every job. This one asks a zygote server for
a fresh fork of a process that has already imported the application and
runs the job there (`zygote_rq.horse`); everything else (heartbeats, the
monitoring loop, the death penalty, stop-job, callbacks, the registries) is
RQ's own code.

The horse is not our child, so it is followed through a pidfd: waiting is a
poll on it, which RQ's monitoring alarm can interrupt at any point; killing
is pidfd_send_signal, which cannot hit a recycled pid; the exit status comes
from the server. The zygote client is neither thread-safe nor reentrant:
only the main thread uses it, and the handlers of the signals that could
reenter it or raise out of it are held back while it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from rq.callbacks import execute_success_callback
from rq.defaults import (
    DEFAULT_LOGGING_DATE_FORMAT,
    DEFAULT_LOGGING_FORMAT,
    UNSERIALIZABLE_RETURN_VALUE_PAYLOAD,
)
from rq.job import JobStatus, Retry
from rq.logutils import blue, green, setup_loghandlers
from rq.timeouts import JobTimeoutException
from rq.utils import decode_redis_hash, now, utcformat, utcparse
from rq.worker import SHUTDOWN_SIGNAL, Worker

from zygote.errors import ZygoteError
from zygote.handle import relay_output

from .process import Horse, WaitResult, held_signals, outcome, returned, wait_result
from .settings import Finished, HorseSettings, import_path, redis_kwargs

if TYPE_CHECKING:
    from rq.executions import Execution
    from rq.job import Job
    from rq.queue import Queue

    # Imported where used: the zygote preloads this module through
    # zygote_rq.horse, and it has no use for the client or ZeroMQ.
    from zygote.client import Zygote
    from zygote.embedded import EmbeddedServer

__all__ = ["HORSE_MODULE", "Finished", "HorseSettings", "ZygoteWorker"]

log = logging.getLogger("zygote.rq")

#: The module a zygote server needs for this worker (preloaded, or importable).
HORSE_MODULE = "zygote_rq.horse"
HORSE_TASK = f"{HORSE_MODULE}:run_job"


class ZygoteWorker(Worker):
    """RQ's `Worker`, with each job's work horse a fresh zygote worker.

    Without `$ZYGOTE_ENDPOINT` it runs a private zygote server preloading
    `zygote_rq.horse` and `$ZYGOTE_PRELOAD` for as long as it works.
    """

    #: What each horse runs, with the arguments of `zygote_rq.horse.run_job`.
    horse_task = HORSE_TASK

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._zygote: Zygote | None = None
        self._server: EmbeddedServer | None = None
        self._redis_kwargs: dict[str, Any] = {}
        self._horse_settings: HorseSettings | None = None
        self._horse: Horse | None = None
        self._spawn_error: ZygoteError | None = None
        # Guards _horse and the kill requests: RQ's pubsub thread kills.
        self._horse_lock = threading.Lock()
        self._spawning = False
        self._pending_kill: int | None = None
        self._finished: Finished | None = None  # the horse's job returned

    # -- the worker's life --------------------------------------------------

    def bootstrap(
        self,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """Connect to the zygote server (starting ours first), then RQ's bootstrap."""
        # Ours, and the horses' loggers, at the level RQ's worker logs at.
        level = logging_level if logging_level is not None else self.log.getEffectiveLevel()
        setup_loghandlers(level, date_format, log_format, name="zygote.rq")
        self._redis_kwargs = redis_kwargs(self.connection)
        self._horse_settings = self._describe_for_horse(level, date_format, log_format)
        self._connect()
        try:
            super().bootstrap(logging_level, date_format, log_format)
        except BaseException:
            self._disconnect()
            raise

    def teardown(self) -> None:
        """RQ's teardown, then stop our zygote server."""
        try:
            super().teardown()
        finally:
            if not self.is_horse:
                self._disconnect()

    def _connect(self) -> None:
        from zygote.client import Zygote

        endpoint = os.environ.get("ZYGOTE_ENDPOINT")
        if not endpoint:
            from zygote.embedded import EmbeddedServer, preload_from_env

            self._server = EmbeddedServer([HORSE_MODULE, *preload_from_env()])
            log.info(
                "Worker %s: starting a zygote server (preload: %s)",
                self.name,
                ", ".join(self._server.preload),
            )
            endpoint = self._server.start()
        try:
            self._zygote = Zygote(endpoint)
            self._zygote.ping()
        except BaseException:
            self._disconnect()
            raise
        log.info("Worker %s: work horses come from the zygote server at %s", self.name, endpoint)

    def _disconnect(self) -> None:
        client, self._zygote = self._zygote, None
        server, self._server = self._server, None
        if client is not None:
            client.close()
        if server is not None:
            log.info("Worker %s: stopping the zygote server", self.name)
            server.stop()

    def _restart_dead_server(self) -> None:
        """Our zygote server died (killed, or it gave up on a crashing
        preload): start a new one rather than fail every job from now on.
        If that fails too, the job fails and the worker stops after it."""
        server = self._server
        if server is None or server.process is None or server.process.poll() is None:
            return
        log.error(
            "Worker %s: the zygote server exited with status %s; starting a new one",
            self.name,
            server.process.returncode,
        )
        self._disconnect()
        try:
            self._connect()
        except ZygoteError:
            log.error("Worker %s: no zygote server; stopping after this job", self.name)
            self._stop_requested = True
            raise

    def _describe_for_horse(
        self, logging_level: int | str, date_format: str, log_format: str
    ) -> HorseSettings:
        # Checked here, once: a worker that cannot describe itself to its
        # horses should not start at all.
        return {
            "worker_class": import_path(type(self)),
            "queues": self.queue_names(),
            "job_class": import_path(self.job_class),
            "queue_class": import_path(self.queue_class),
            "serializer": self._serializer_arg,
            "exception_handlers": [import_path(h) for h in self._exc_handlers],
            "default_result_ttl": self.default_result_ttl,
            "worker_ttl": self.worker_ttl,
            "job_monitoring_interval": self.job_monitoring_interval,
            "log_job_description": self.log_job_description,
            "disable_default_exception_handler": self.disable_default_exception_handler,
            "logging": (logging_level, date_format, log_format),
        }

    # -- the horse, seen from the worker ------------------------------------

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        """Start the job's work horse: `zygote_rq.horse:run_job` in a fresh
        zygote worker, where RQ's Worker forks itself. A failed spawn is
        kept for monitor_work_horse, which fails the job."""
        self._spawn_error = None
        self._finished = None
        with self._horse_lock:
            self._spawning = True
        try:
            # A cold shutdown's handler must find the horse registered, and
            # kill it, rather than leave it running unseen.
            with held_signals():
                horse = self._spawn_horse(job, queue)
        finally:
            with self._horse_lock:
                self._spawning = False
                pending, self._pending_kill = self._pending_kill, None
        if horse is not None and pending is not None:
            self.kill_horse(signal.Signals(pending))

    def _spawn_horse(self, job: Job, queue: Queue) -> Horse | None:
        execution = self.execution
        assert execution is not None, "fork_work_horse() without prepare_execution()"
        env = {"RQ_WORKER_ID": self.name, "RQ_JOB_ID": job.id, "RQ_EXECUTION_ID": execution.id}
        # RQ's horse does this first thing; here, on the worker's warm
        # connection, the horse needs none for a job that returns. The
        # horse gets the job as stored after it, as a forked one would.
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        stored = decode_redis_hash(self.connection.hgetall(job.key))
        try:
            self._restart_dead_server()
            assert self._zygote is not None, "fork_work_horse() before bootstrap()"
            handle = self._zygote.spawn(
                self.horse_task,
                job.id,
                [execution.id, execution.created_at.timestamp()],
                queue.name,
                self.name,
                self._redis_kwargs,
                self._horse_settings,
                stored,
                _env=env,
            )
        except ZygoteError as exc:
            log.error("Worker %s: no work horse for job %s: %s", self.name, job.id, exc)
            self._spawn_error = exc
            return None
        horse = Horse(handle)
        with self._horse_lock:
            self._horse = horse
        self._horse_pid = horse.pid
        self.procline(f"Spawned {horse.pid} at {time.time()}")
        return horse

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Execution) -> None:
        """RQ's monitoring loop; a job whose horse could not be started is failed."""
        error, self._spawn_error = self._spawn_error, None
        if error is not None:
            self._fail_unspawned(job, queue, execution, error)
            return
        try:
            super().monitor_work_horse(job, queue, execution)
        finally:
            with self._horse_lock:
                horse, self._horse = self._horse, None
            if horse is not None:
                horse.close()
            self._horse_pid = 0
        finished, self._finished = self._finished, None
        if finished is not None:
            # As in RQ's horse, nothing a signal does (a cold shutdown's
            # SystemExit) cuts the bookkeeping of a job that has run short.
            with held_signals():
                self._record_success(job, queue, execution, finished)

    def handle_job_failure(self, *args: Any, **kwargs: Any) -> None:
        """RQ's, unless the horse returned: RQ's monitor can still decide
        the job failed (it gives up on a horse past its timeout + 60 s
        without reading the exit status), but its success is recorded next."""
        if self._finished is not None:
            log.warning("Worker %s: its horse returned: not failing the job", self.name)
            return
        super().handle_job_failure(*args, **kwargs)

    def _record_success(
        self, job: Job, queue: Queue, execution: Execution, finished: Finished
    ) -> None:
        """What RQ's horse does once a job has returned and its success
        callback has run (RQ 3.0's _finalize_success), on this worker's
        connection: the horse ran the job, and the callback, and exited."""
        try:
            job.started_at = utcparse(finished["started_at"])
            job.ended_at = utcparse(finished["ended_at"])
            job._result = job.serializer.loads(finished["result"])
            job._status = JobStatus.FINISHED
            self.handle_job_success(
                job=job,
                queue=queue,
                started_job_registry=queue.started_job_registry,
                execution=execution,
            )
            job.send_webhooks(JobStatus.FINISHED)
        except Exception:  # as RQ's perform_job: the job fails instead
            self._finalize_failure(job, queue, execution, sys.exc_info())
            return
        ok = blue("Job OK")
        self.log.info("Worker %s: %s: %s (%s)", self.name, green(job.origin), ok, job.id)

    def _fail_unspawned(
        self, job: Job, queue: Queue, execution: Execution, error: ZygoteError
    ) -> None:
        """The job never ran: fail it (RQ's retry rules apply) and go on."""
        exc_string = f"zygote could not start a work horse: {type(error).__name__}: {error}"
        exc_string += "".join(f"\n  {reason}" for reason in getattr(error, "reasons", []))
        if len(self.queues) == 1:
            # Where the horse would have taken it from; left there, RQ's
            # maintenance would fail it a second time.
            queue.intermediate_queue.remove(job.id)
        job.ended_at = now()
        self.handle_job_failure(job, queue=queue, exc_string=exc_string, execution=execution)

    def wait_for_horse(self) -> WaitResult:
        """Wait for the horse to end, or to return; its pid, wait status and usage."""
        horse = self._horse
        if horse is None:
            return None, None, None
        if horse.exit is None:
            assert self._zygote is not None
            # Where the monitoring alarm may interrupt: outside the client.
            horse.wait_done(self._zygote.fileno(), lambda: returned(horse.handle))
            with held_signals():
                # Kept: if a signal held back here raises, RQ's loop calls again.
                horse.exit = self._exit_status(horse)
        return horse.exit

    def _exit_status(self, horse: Horse) -> WaitResult:
        handle = horse.handle
        if returned(handle):
            # RQ's code in the horse is done with the job: go on without
            # waiting for the process to exit (a zygote worker takes its
            # time, at idle priority, to leave); it has had its say.
            result: WaitResult = (horse.pid, 0, None)
        else:  # it raised, or was killed, or exited before its result came
            try:
                result = wait_result(handle.wait())
            except ZygoteError as exc:
                log.error("Worker %s: no exit status for horse %d: %s", self.name, horse.pid, exc)
                return horse.pid, None, None
        pid, status, usage = result
        self._relay_output(horse)
        error, value = outcome(handle) if status == 0 else (None, None)
        if isinstance(value, dict):
            self._finished = value  # type: ignore[assignment]
        if error is not None:
            log.error(
                "Worker %s: horse %d raised %s\n%s",
                self.name,
                horse.pid,
                error,
                error.remote_traceback,
            )
            status = 1 << 8  # it never ran the job: RQ is to fail it, as for exit status 1
        return pid, status, usage

    @staticmethod
    def _relay_output(horse: Horse) -> None:
        """What the job printed: to this worker's stdout/stderr, as a forked
        horse's would have gone (here once it has ended; the server sends a
        job's output before its result)."""
        with contextlib.suppress(ZygoteError):
            for stream, data in horse.handle.output(timeout=0):
                relay_output(stream, data)

    def kill_horse(self, sig: signal.Signals = SHUTDOWN_SIGNAL) -> None:
        """Signal the horse, through its pidfd. Called from RQ's pubsub
        thread too; a horse still being spawned gets the signal once it is."""
        with self._horse_lock:
            horse = self._horse
            if horse is None:
                if self._spawning:
                    self._pending_kill = sig
                return
        if horse.kill(sig):
            name = signal.Signals(sig).name
            log.info("Worker %s: sent %s to horse %d", self.name, name, horse.pid)
        else:
            log.debug("Worker %s: horse %d already ended", self.name, horse.pid)

    # -- the horse's side -----------------------------------------------------

    def main_work_horse(self, job: Job, queue: Queue) -> bool | Finished:
        """Perform `job` in this process, a zygote worker: a `Finished` for
        the worker to record if it returned, else whether RQ's code here
        recorded a success (a `Retry`) or a failure.

        RQ's own ends in os._exit(), which would cut the zygote worker off
        before it reports and runs its exit hooks; this returns instead, and
        exits with status 1 where RQ's does (RQ itself failed around the job).
        """
        self.setup_work_horse_signals()
        self._is_horse = True
        execution = self.execution
        assert execution is not None, "main_work_horse() without an execution"
        try:
            succeeded = self.perform_job(job, queue, execution)
        except BaseException:
            log.exception("Worker %s: the work horse failed around job %s", self.name, job.id)
            raise SystemExit(1) from None
        finished, self._finished = self._finished, None
        return finished if succeeded and finished is not None else succeeded

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """RQ's perform_job, less prepare_job_execution (the worker did it
        before the spawn)."""
        try:
            job.started_at = now()
            timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                return_value = job.perform()
            self._finalize_success(job, queue, execution, return_value)
        except:  # noqa: E722 -- as RQ's: whatever the job raised fails it
            self._finalize_failure(job, queue, execution, sys.exc_info())
            return False
        return True

    def _finalize_success(
        self, job: Job, queue: Queue, execution: Execution, return_value: Any
    ) -> None:
        """In a horse: run the success callback and leave the rest of RQ's
        bookkeeping (result, registries, statistics) to the worker, which
        does it on its warm connection; this process then needs none. A
        `Retry` is RQ's business, here."""
        if not self._is_horse or isinstance(return_value, Retry):
            super()._finalize_success(job, queue, execution, return_value)
            return
        job.ended_at = now()
        job._result = return_value
        job._status = JobStatus.FINISHED
        execute_success_callback(job, self.death_penalty_class, return_value)
        try:  # here: only this process has the value
            result = job.serializer.dumps(return_value)
        except Exception:  # what RQ's Result stores then; the job still succeeds
            result = job.serializer.dumps(UNSERIALIZABLE_RETURN_VALUE_PAYLOAD)
        assert job.started_at is not None
        self._finished = {
            "started_at": utcformat(job.started_at),
            "ended_at": utcformat(job.ended_at),
            "result": result,
        }
