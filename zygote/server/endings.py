"""How a job leaves the spawner: it *ends* (its process exited; its clients
hear how, and its outcome if the worker sent none), or it *fails* (it never
got a worker: killed by a client before it was ready, the server stopping,
or out of attempts) — or, after a failed start, it is tried again.

Each way out does the same four things, here only: the job moves to `done`,
leaves the spawner's table, its clients are told (through `Clients`, the
supervisor's side, which writes the records) and the log says why. The
retry policy (`--spawn-retries`) decides between failing and trying again.
The spawner keeps the queue and the forks. Part of the supervisor process.
"""

from __future__ import annotations

import logging

from ..config import ServerConfig
from ..linux import signal_name
from ..protocol import ErrorCode, shutting_down
from . import outcomes
from .children import Child, Job
from .lifecycle import JobState
from .loop import EventLoop
from .outcomes import Clients

log = logging.getLogger("zygote.supervisor")


class Endings:
    def __init__(
        self,
        config: ServerConfig,
        loop: EventLoop,
        clients: Clients,
        jobs: dict[str, Job],
        counts: outcomes.Counts,
    ) -> None:
        self.config = config
        self.loop = loop
        self.clients = clients
        self.jobs = jobs  # the spawner's table: a job leaves it here
        self.counts = counts

    def give_up(self, job: Job, reason: str, stopping: str | None) -> bool:
        """A start of `job` failed (for `reason`; "" when it was never
        tried): True if it fails now — killed by a client, the server
        `stopping`, or out of attempts — False if it is to be queued again."""
        job.child = None
        if reason:
            job.reasons.append(reason)
        if job.killed is not None:
            why = f"killed by a client ({signal_name(job.killed)}) before it was ready"
            self.failed(job, ErrorCode.SPAWN_FAILED, why)
        elif stopping:
            self.failed(job, ErrorCode.SHUTTING_DOWN, shutting_down(stopping))
        elif job.attempts <= self.config.spawn_retries:
            log.warning(
                "spawn %s: %s; replacing it (attempt %d of %d)",
                job.handle,
                reason,
                job.attempts + 1,
                self.config.spawn_retries + 1,
            )
            return False
        else:
            text = f"no healthy worker after {len(job.reasons)} attempts: {reason}"
            log.error("spawn %s (%s): %s", job.handle, job.spawn.task, text)
            self.failed(job, ErrorCode.SPAWN_FAILED, text)
        return True

    def failed(self, job: Job, code: ErrorCode, text: str) -> None:
        """`job` never got a worker: its clients get the error."""
        job.move(JobState.DONE)
        self.jobs.pop(job.handle, None)
        self.clients.job_failed(job.handle, code, text, job.reasons)

    def ended(
        self,
        job: Job,
        child: Child,
        code: int | None,
        sig: int | None,
        words: str,
        result: bytes | None = None,
    ) -> None:
        """Report how a job's process ended (and its outcome, if the worker
        sent none), and log it in words."""
        lifetime = self.loop.now() - child.requested
        exited = outcomes.exit_report(job, child, code, sig, words, lifetime)
        job.move(JobState.DONE)
        self.jobs.pop(job.handle, None)
        self.clients.job_ended(job.handle, result, exited)
        self.counts["completed"] += 1
        level, what = outcomes.job_ended_log(job, code, words, lifetime, result)
        log.log(level, "worker %d [%s] %s", child.pid, job.handle, what)
