"""From an accepted request to a finished worker: the queue, fork requests
(or a child from the ready pool), start-up deadlines, replacement of corrupt
children and retries, and each job's outcome and exit, decoded in words.
The worker processes themselves are watched by the tracker. Part of the
supervisor process.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any, Protocol

from ..codec import (
    FrameDecoder,
    encode,
    frame,
)
from ..config import ServerConfig
from ..linux import describe_wait_status, send_signal
from ..protocol import (
    LOST,
    SHUTTING_DOWN,
    SPAWN_FAILED,
    TIMEOUT,
    Exited,
    Fork,
    Forked,
    ForkFailed,
    Go,
    Result,
    Task,
)
from .children import Job, JobState, PoolFork, Worker, ZygoteProc
from .fleet import Fleet
from .loop import EventLoop
from .pool import ReadyPool
from .store import Record
from .tracker import Tracker

log = logging.getLogger("zygote.supervisor")

#: Tasks whose arguments fit in this travel with the fork request, so the
#: child finds them decoded in memory; bigger ones go down the channel.
CARRY_LIMIT = 64 * 1024
_GO_FRAME = frame(encode(Go()))


class Clients(Protocol):
    """What the spawner tells the clients' side (the supervisor)."""

    def on_started(self, job: Job) -> None: ...
    def on_outcome(self, record: Record) -> None: ...
    def on_failed(self, job: Job, code: str, text: str) -> None: ...


class Spawner:
    def __init__(self, config: ServerConfig, loop: EventLoop, clients: Clients) -> None:
        self.config = config
        self.loop = loop
        self.clients = clients
        self.fleet: Fleet  # set by the supervisor, which wires the two together
        self.queue: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}
        self.slots = 0  # workers alive or being forked
        self.stopping: str | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures_by_step: collections.Counter[str] = collections.Counter()
        self.guard_wait_seconds = 0.0
        self._pool_error = ""  # the ready pool's last fork error, logged once
        self.tracker = Tracker(config, loop, self)
        self.pool = ReadyPool(
            config.prefork, loop, self._request_pool_fork, self.tracker.close_channel
        )

    @property
    def workers(self) -> dict[int, Worker]:
        return self.tracker.workers

    # -- requests -----------------------------------------------------------

    def full(self) -> bool:
        """No room in the queue. (It only fills when every slot is taken.)"""
        return len(self.queue) >= self.config.queue_size

    def submit(self, job: Job) -> None:
        self.jobs[job.handle] = job
        self.queue.append(job)
        self.counts["accepted"] += 1
        self.dispatch()

    def kill(self, handle: str, sig: int) -> int | None:
        """Signal the worker running `handle`; its pid, or None if none runs."""
        job = self.jobs.get(handle)
        worker = job.worker if job else None
        if worker is None or not worker.alive:
            return None
        worker.signal(sig)
        return worker.pid

    def dispatch(self) -> None:
        """Start queued jobs while there are free slots: on a child from the
        ready pool if there is one, else on a new fork."""
        while self.queue and self.slots < self.config.max_workers:
            worker = self.pool.take(self.fleet.current)
            if worker is not None:
                self._assign(worker, self.queue.popleft())
                continue
            zygote = self.fleet.ready
            if zygote is None or not self._request_fork(zygote, self.queue[0]):
                return
            self.queue.popleft()

    def _request_fork(self, zygote: ZygoteProc, job: Job) -> bool:
        spawn = job.spawn
        # A fork request must stay small (the zygote reads a bounded buffer):
        # a task too big to travel with it, env and cwd included, goes down
        # the worker's channel.
        size = len(spawn.payload) + len(spawn.task) + len(spawn.cwd or "")
        size += sum(len(k) + len(v) + 8 for k, v in (spawn.env or {}).items())
        job.carried = size + 1024 <= CARRY_LIMIT
        request = Fork(job.handle)
        if job.carried:
            request = Fork(job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd)
        if not self._fork(zygote, job, request):
            return False
        self.slots += 1
        return True

    def _request_pool_fork(self, fork: PoolFork) -> bool:
        zygote = self.fleet.ready
        return (
            zygote is not None and not self.stopping and self._fork(zygote, fork, Fork(fork.handle))
        )

    def _fork(self, zygote: ZygoteProc, start: Job | PoolFork, request: Fork) -> bool:
        if not self.fleet.send_fork(zygote, request):
            return False
        start.requested = time.monotonic()
        start.state = JobState.FORKING
        start.zygote = zygote
        zygote.pending[start.handle] = start
        # Both deadlines are armed before the fork: a child that deadlocks
        # after it never reports anything, so only the parent side can tell.
        start.timers = [
            self.loop.later(self.config.fork_timeout, self._fork_overdue, start),
            self.loop.later(self.config.validate_timeout, self._ready_overdue, start),
        ]
        return True

    def _assign(self, worker: Worker, job: Job) -> None:
        """Hand a ready pool child its task: it is running the moment it reads it."""
        self.slots += 1
        job.carried = False  # its task goes down the channel, not with a fork
        worker.job, job.worker, job.zygote = job, worker, worker.zygote
        worker.requested = job.requested = time.monotonic()
        job.state = JobState.RUNNING
        job.record.warnings = worker.warnings
        # Answer the client first: measured, writing the task first made the
        # child's wake-up compete with the reply, slowing both.
        self._running(worker, job)
        self._send_task(worker, job)
        log.debug("spawn %s %s: pool worker %d", job.handle, job.spawn.task, worker.pid)

    def _running(self, worker: Worker, job: Job) -> None:
        """The job has a ready worker: answer its clients, start its clock."""
        self.clients.on_started(job)
        if job.spawn.timeout is not None:
            self.tracker.time_limit(worker, job.spawn.timeout, f"[{job.handle}] {job.spawn.task}")

    def _send_task(self, worker: Worker, job: Job) -> None:
        spawn = job.spawn
        task = Task(job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd)
        self.tracker.send(worker, frame(encode(task)))

    # -- what zygotes report (fleet.ZygoteEvents) -----------------------------

    def on_zygote_ready(self) -> None:
        self.pool.retire_stale(self.fleet.current)
        self.dispatch()
        self.pool.refill()

    def on_forked(self, zygote: ZygoteProc, msg: Forked, fds: list[int]) -> None:
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            self.fleet.trouble(zygote, f"sent {len(fds)} descriptors with a fork reply")
            job = zygote.pending.get(msg.handle)
            if isinstance(job, Job) and job.carried and job.state is JobState.FORKING:
                # The zygote has told this child to go: it may be running
                # the task right now, so running it again could run it
                # twice. Stop it and give up on the request instead. (The
                # pid is still that child's: its zygote has not reaped it.)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(msg.pid, signal.SIGKILL)
                del zygote.pending[msg.handle]
                job.cancel_timers()
                self.slots -= 1
                text = (
                    f"worker {msg.pid} was forked, but the supervisor lost its descriptors "
                    "(out of file descriptors?); it was killed, and as the task may have "
                    "started it is not run again"
                )
                log.error("spawn %s %s: %s", job.handle, job.spawn.task, text)
                self._fail(job, SPAWN_FAILED, text)
            # Otherwise the job stays pending and is queued again when the
            # zygote goes: the child never got its task, and exits when it
            # finds its channel's other end gone.
            return
        job = zygote.pending.pop(msg.handle, None)
        channel_fd, pidfd = fds
        if job is None or job.state is not JobState.FORKING:
            # We gave up on this fork already; the child must not run.
            send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            os.close(channel_fd)
            return
        if msg.guard_wait:
            self.counts["fork_guard_waits"] += 1
            self.guard_wait_seconds += msg.guard_wait
        if msg.guards_missed:
            self.counts["fork_guard_timeouts"] += 1
        channel = socket.socket(fileno=channel_fd)
        channel.setblocking(False)
        worker = Worker(msg.pid, pidfd, channel, job, zygote, job.requested)
        worker.decoder = FrameDecoder(self.config.max_message_bytes + 65536)
        job.worker = worker
        job.state = JobState.STARTING
        job.timers[0].cancel()  # the fork deadline; the ready one stays
        worker.warnings = list(msg.warnings)
        self.tracker.track(worker)
        if isinstance(job, PoolFork):
            return
        job.record.warnings = list(msg.warnings)
        if not job.carried:
            self._send_task(worker, job)
        log.debug(
            "spawn %s %s: worker %d forked by generation %d",
            job.handle,
            job.spawn.task,
            worker.pid,
            zygote.generation,
        )

    def on_fork_failed(self, zygote: ZygoteProc, msg: ForkFailed) -> None:
        job = zygote.pending.pop(msg.handle, None)
        if job is None or job.state is not JobState.FORKING:
            return
        if isinstance(job, PoolFork):
            job.cancel_timers()
            if msg.error != self._pool_error:  # once per change, not per retry
                log.warning("ready pool: %s", msg.error)
                self._pool_error = msg.error
            if msg.refused:
                self.counts["refused_forks"] += 1
                self.pool.refused()
            else:
                self.counts["failed_starts"] += 1
                self.pool.lost()
            return
        self.slots -= 1
        if msg.refused:  # the thread policy: retrying cannot help
            self.counts["refused_forks"] += 1
            log.error("spawn %s: %s", job.handle, msg.error)
            self._fail(job, SPAWN_FAILED, msg.error)
            self.dispatch()
        else:
            self._start_failed(job, msg.error, zygote)

    def on_reaped(self, pid: int, status: int, rusage: tuple[float, float, int]) -> None:
        if not self.tracker.reaped(pid, status, rusage):
            log.debug("reaped process %d (%s)", pid, describe_wait_status(status))

    def on_zygote_gone(self, zygote: ZygoteProc) -> None:
        for job in reversed(list(zygote.pending.values())):
            job.cancel_timers()
            if isinstance(job, PoolFork):
                self.pool.lost()
                continue
            # Never forked, or forked into a child that will see its channel
            # close and exit without running anything: safe to run again. It
            # counts as an attempt all the same, so that a request that kills
            # every zygote it meets ends in an error, not in a loop.
            self.slots -= 1
            job.zygote = None
            job.attempts += 1
            job.reasons.append(f"zygote generation {zygote.generation} was lost while forking it")
            if self.stopping:
                self._fail(job, SHUTTING_DOWN, f"server shutting down: {self.stopping}")
            elif job.attempts > self.config.spawn_retries:
                self._fail(job, SPAWN_FAILED, f"no healthy worker: {job.reasons[-1]}")
            else:
                job.state = JobState.QUEUED
                self.queue.appendleft(job)
        zygote.pending.clear()
        for worker in list(self.workers.values()):
            if worker.zygote is not zygote:
                continue
            if worker.pooled:  # the old generation's code: let it go
                self.pool.retire(worker)
            elif isinstance(worker.job, Job) and worker.job.carried:
                # It may have died between handing us the channel and
                # telling the child to go; one more Go is harmless.
                self.tracker.send(worker, _GO_FRAME)
        self.tracker.zygote_gone(zygote, set(self.fleet.zygotes))

    # -- deadlines ------------------------------------------------------------

    def _fork_overdue(self, job: Job | PoolFork) -> None:
        if job.state is JobState.FORKING and job.zygote is not None:
            timeout = self.config.fork_timeout
            self.fleet.broken(job.zygote, f"did not answer a fork request within {timeout:g}s")

    def _ready_overdue(self, job: Job | PoolFork) -> None:
        worker = job.worker
        if job.state is JobState.FORKING:
            self._fork_overdue(job)
        elif job.state is JobState.STARTING and worker is not None and worker.alive:
            where = f" (stuck in {worker.phase})" if worker.phase else ""
            failure = f"not ready within {self.config.validate_timeout:g}s{where}"
            self.tracker.fail_start(worker, failure, worker.phase or "start-up")

    # -- start failures ---------------------------------------------------------

    def _start_failed(self, job: Job, reason: str, zygote: ZygoteProc | None) -> None:
        """A start attempt failed: retry the job, or give up and tell the client.
        A failure reported after its zygote was replaced does not count
        against the request: the zygote, not the request, was the problem."""
        job.cancel_timers()
        job.worker = None
        job.zygote = None
        job.reasons.append(reason)
        self.counts["failed_starts"] += 1
        if zygote is not None and zygote is self.fleet.current:
            job.attempts += 1
            self.fleet.child_corrupt(zygote)
        if self.stopping:
            self._fail(job, SHUTTING_DOWN, f"server shutting down: {self.stopping}")
        elif job.attempts <= self.config.spawn_retries:
            log.warning(
                "spawn %s: %s; replacing it (attempt %d of %d)",
                job.handle,
                reason,
                job.attempts + 1,
                self.config.spawn_retries + 1,
            )
            job.state = JobState.QUEUED
            self.queue.appendleft(job)
        else:
            text = f"no healthy worker after {len(job.reasons)} attempts: {reason}"
            log.error("spawn %s (%s): %s", job.handle, job.spawn.task, text)
            self._fail(job, SPAWN_FAILED, text)
        self.dispatch()

    def _fail(self, job: Job, code: str, text: str) -> None:
        job.cancel_timers()
        job.state = JobState.DONE
        self.jobs.pop(job.handle, None)
        self.clients.on_failed(job, code, text)

    # -- what the tracker reports (tracker.WorkerEvents) -----------------------

    def on_ready(self, worker: Worker) -> None:
        job = worker.job
        if job.state is not JobState.STARTING:
            return
        worker.ready_at = time.monotonic()
        job.state = JobState.RUNNING
        job.cancel_timers()
        self.fleet.child_healthy(worker.zygote)
        if isinstance(job, PoolFork):
            self._pool_error = ""
            self.pool.add(worker)
            if self.stopping:  # forked before the stop, ready after it
                self.pool.retire(worker)
            self.pool.retire_stale(self.fleet.current)
            self.dispatch()
            return
        self._running(worker, job)
        log.debug(
            "worker %d [%s] ready in %.1f ms",
            worker.pid,
            job.handle,
            (worker.ready_at - worker.requested) * 1000,
        )

    def on_result(self, worker: Worker, data: bytes) -> None:
        if isinstance(worker.job, Job):
            worker.job.record.result = data
            self.clients.on_outcome(worker.job.record)

    def on_gone(self, worker: Worker) -> None:
        if isinstance(worker.job, Job):
            self.slots -= 1
            self.dispatch()

    def on_ended(self, worker: Worker) -> None:
        job = worker.job
        code, sig, words = worker.exit_status()
        lifetime = time.monotonic() - worker.requested
        if job.state in (JobState.FORKING, JobState.STARTING):
            self._corrupt_child(worker, words)
            return
        if isinstance(job, PoolFork):  # a pool child that never got a task
            if not worker.retired:
                log.warning("pool worker %d %s while waiting for a task", worker.pid, words)
                self.pool.lost(worker)
            return
        record = job.record
        if not worker.result_seen:
            outcome = TIMEOUT if worker.timed_out else LOST
            what = words
            if worker.timed_out:
                what = f"ran past its {job.spawn.timeout:g}s timeout and was killed"
            message = f"worker {worker.pid} running {job.spawn.task} {what}"
            record.result = encode(
                Result(job.handle, outcome, message=message, exit_code=code, signal=sig)
            )
        utime, stime, maxrss = worker.rusage
        record.exited = encode(
            Exited(job.handle, worker.pid, code, sig, words, lifetime, utime, stime, maxrss)
        )
        job.cancel_timers()
        job.state = JobState.DONE
        self.jobs.pop(job.handle, None)
        self.clients.on_outcome(record)
        self.counts["completed"] += 1
        level = logging.INFO if code == 0 and worker.result_seen else logging.WARNING
        log.log(
            level,
            "worker %d [%s] %s %s after %.1f ms",
            worker.pid,
            job.handle,
            job.spawn.task,
            words,
            lifetime * 1000,
        )

    def _corrupt_child(self, worker: Worker, words: str) -> None:
        """A child that ended before ready: count it against its step and its
        zygote, and try the job again (or fork another pool child)."""
        step = worker.failed_step or worker.phase or "start-up"
        self.failures_by_step[step] += 1
        reason = worker.failure or f"worker {worker.pid} {words} before it was ready"
        if worker.phase and not worker.failure:
            reason += f" (in {worker.phase})"
        job = worker.job
        log.warning("worker %d [%s] %s; it was %s", worker.pid, job.handle, reason, words)
        if isinstance(job, Job):
            self._start_failed(job, reason, worker.zygote)
            return
        job.cancel_timers()
        self.counts["failed_starts"] += 1
        if worker.zygote is self.fleet.current:
            self.fleet.child_corrupt(worker.zygote)
        self.pool.lost()

    # -- stopping -------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Refuse what waits in the queue; running and starting workers go on."""
        self.stopping = reason
        self.pool.retire_all()
        while self.queue:
            self._fail(self.queue.popleft(), SHUTTING_DOWN, f"server shutting down: {reason}")

    def stats(self) -> dict[str, Any]:
        busy = sum(isinstance(worker.job, Job) for worker in self.workers.values())
        return {
            "workers": busy,
            "pool_ready": len(self.pool.ready),
            "pool_starting": self.pool.starting,
            "pool_size": self.pool.size,
            "pool_taken": self.pool.taken,
            "queued": len(self.queue),
            "accepted": self.counts["accepted"],
            "completed": self.counts["completed"],
            "failed_starts": self.counts["failed_starts"],
            "refused_forks": self.counts["refused_forks"],
            "validator_failures": dict(self.failures_by_step),
            "fork_guard_waits": self.counts["fork_guard_waits"],
            "fork_guard_wait_seconds": round(self.guard_wait_seconds, 3),
            "fork_guard_timeouts": self.counts["fork_guard_timeouts"],
        }
