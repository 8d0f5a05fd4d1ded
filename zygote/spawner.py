"""From an accepted request to a finished worker: the queue, fork requests,
start-up checks under a deadline, replacement of corrupt children, task
timeouts, and exits decoded in words. Part of the supervisor process.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import time
from typing import Any, Protocol

import zmq

from .children import Job, JobState, Worker, ZygoteProc, ZygoteState
from .codec import (
    decode_channel,
    encode,
    frame,
)
from .config import ServerConfig, signal_by_name
from .fleet import Fleet
from .linux import describe_wait_status, send_signal, wait_status_parts
from .loop import EventLoop
from .protocol import (
    LOST,
    SHUTTING_DOWN,
    SPAWN_FAILED,
    TIMEOUT,
    Exited,
    Fork,
    Forked,
    ForkFailed,
    Go,
    Message,
    Phase,
    ProtocolError,
    Ready,
    Result,
    Task,
    ValidatorFailed,
)
from .store import Record

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
        self.workers: dict[int, Worker] = {}
        self.slots = 0  # workers alive or being forked
        self.stopping: str | None = None
        self.kill_signal = signal_by_name(config.kill_signal)
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures_by_step: collections.Counter[str] = collections.Counter()

    # -- requests -----------------------------------------------------------

    def full(self) -> bool:
        busy = self.slots >= self.config.max_workers or bool(self.queue)
        return busy and len(self.queue) >= self.config.queue_size

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
        """Start queued jobs while there are free slots and a ready zygote."""
        while self.queue and self.slots < self.config.max_workers:
            zygote = self.fleet.ready
            if zygote is None or not self._request_fork(zygote, self.queue[0]):
                return
            self.queue.popleft()

    def _request_fork(self, zygote: ZygoteProc, job: Job) -> bool:
        spawn = job.spawn
        job.carried = len(spawn.payload) <= CARRY_LIMIT
        request = Fork(job.handle, env=spawn.env, cwd=spawn.cwd)
        if job.carried:
            request = Fork(job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd)
        if not self.fleet.send_fork(zygote, request):
            return False
        self.slots += 1
        job.requested = time.monotonic()
        job.state = JobState.FORKING
        job.zygote = zygote
        zygote.pending[job.handle] = job
        # Both deadlines are armed before the fork: a child that deadlocks
        # after it never reports anything, so only the parent side can tell.
        job.timers = [
            self.loop.later(self.config.fork_timeout, self._fork_overdue, job),
            self.loop.later(self.config.validate_timeout, self._ready_overdue, job),
        ]
        return True

    # -- what zygotes report (fleet.ZygoteEvents) -----------------------------

    def on_zygote_ready(self) -> None:
        self.dispatch()

    def on_forked(self, zygote: ZygoteProc, msg: Forked, fds: list[int]) -> None:
        job = zygote.pending.pop(msg.handle, None)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            self.fleet.broken(zygote, f"sent {len(fds)} descriptors with a fork reply")
            return
        channel_fd, pidfd = fds
        if job is None or job.state is not JobState.FORKING:
            # We gave up on this fork already; the child must not run.
            send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            os.close(channel_fd)
            return
        channel = socket.socket(fileno=channel_fd)
        channel.setblocking(False)
        worker = Worker(msg.pid, pidfd, channel, job, zygote, job.requested)
        job.worker = worker
        job.state = JobState.STARTING
        job.timers[0].cancel()  # the fork deadline; the ready one stays
        job.record.warnings = list(msg.warnings)
        self.workers[worker.pid] = worker
        self.loop.watch(channel_fd, lambda: self._on_channel(worker))
        self.loop.watch(pidfd, lambda: self._on_exit(worker))
        if not job.carried:
            spawn = job.spawn
            task = Task(job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd)
            if not worker.write(frame(encode(task))):
                self.loop.modify(channel_fd, zmq.POLLIN | zmq.POLLOUT)
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
        self.slots -= 1
        if msg.refused:  # the thread policy: retrying cannot help
            log.error("spawn %s: %s", job.handle, msg.error)
            self._fail(job, SPAWN_FAILED, msg.error)
            self.dispatch()
        else:
            self._start_failed(job, msg.error, zygote)

    def on_reaped(self, pid: int, status: int, rusage: tuple[float, float, int]) -> None:
        worker = self.workers.get(pid)
        if worker is None:
            log.debug("reaped process %d (%s)", pid, describe_wait_status(status))
            return
        worker.status = status
        worker.rusage = rusage
        if worker.alive:
            self._on_exit(worker)
        else:
            self._finish(worker)

    def on_zygote_gone(self, zygote: ZygoteProc) -> None:
        for job in reversed(list(zygote.pending.values())):
            # Never forked, or forked into a child that will see its channel
            # close and exit without running anything: safe to run again.
            self.slots -= 1
            job.cancel_timers()
            job.state = JobState.QUEUED
            job.zygote = None
            self.queue.appendleft(job)
        zygote.pending.clear()
        for worker in list(self.workers.values()):
            if worker.zygote is not zygote:
                continue
            if worker.job.carried and worker.channel_open:
                # It may have died between handing us the channel and
                # telling the child to go; one more Go is harmless.
                worker.write(_GO_FRAME)
            if zygote.reaped and not worker.alive and worker.status is None:
                self._reap_orphan(worker)
                self._finish(worker)

    # -- deadlines ------------------------------------------------------------

    def _fork_overdue(self, job: Job) -> None:
        if job.state is JobState.FORKING and job.zygote is not None:
            timeout = self.config.fork_timeout
            self.fleet.broken(job.zygote, f"did not answer a fork request within {timeout:g}s")

    def _ready_overdue(self, job: Job) -> None:
        worker = job.worker
        if job.state is JobState.FORKING:
            self._fork_overdue(job)
        elif job.state is JobState.STARTING and worker is not None and worker.alive:
            where = f" (stuck in {worker.phase})" if worker.phase else ""
            worker.failure = f"not ready within {self.config.validate_timeout:g}s{where}"
            worker.failed_step = worker.phase or "start-up"
            self._kill_corrupt(worker)

    def _kill_corrupt(self, worker: Worker) -> None:
        """Kill a child that failed its start-up; with SIGABRT, faulthandler
        prints where it was first. SIGKILL follows if that does not do it."""
        worker.signal(self.kill_signal)
        if self.kill_signal != signal.SIGKILL:
            self.loop.later(self.config.kill_grace, worker.signal, signal.SIGKILL)

    def _task_overdue(self, worker: Worker) -> None:
        if not worker.alive or worker.result_seen:
            return
        worker.timed_out = True
        log.warning(
            "worker %d [%s] %s ran past its %gs timeout; sending SIGTERM",
            worker.pid,
            worker.job.handle,
            worker.job.spawn.task,
            worker.job.spawn.timeout,
        )
        worker.signal(signal.SIGTERM)
        self.loop.later(self.config.kill_grace, worker.signal, signal.SIGKILL)

    # -- start failures ---------------------------------------------------------

    def _start_failed(self, job: Job, reason: str, zygote: ZygoteProc | None) -> None:
        """A start attempt failed: retry the job, or give up and tell the client.
        Failures on a zygote that has since been replaced do not count against
        the request: it gets its full retries on the fresh one."""
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

    # -- workers ------------------------------------------------------------

    def _on_channel(self, worker: Worker) -> None:
        if worker.outbox and worker.flush():
            self.loop.modify(worker.channel.fileno(), zmq.POLLIN)
        try:
            frames, closed = worker.read()
        except ProtocolError as exc:
            frames, closed = [], True
            self._misbehaved(worker, f"sent an oversized frame: {exc}")
        for data in frames:
            try:
                msg = decode_channel(data)
            except ProtocolError as exc:
                self._misbehaved(worker, f"sent garbage: {exc}")
                break
            self._on_message(worker, msg, data)
        if closed:
            self._close_channel(worker)

    def _on_message(self, worker: Worker, msg: Message, data: bytes) -> None:
        job = worker.job
        if isinstance(msg, Phase):
            worker.phase = msg.name
        elif isinstance(msg, Ready):
            self._on_ready(worker)
        elif isinstance(msg, Result) and msg.handle == job.handle and not worker.result_seen:
            worker.result_seen = True
            job.record.result = data
            self.clients.on_outcome(job.record)
            self._close_channel(worker)  # the worker's cue to exit
        elif isinstance(msg, ValidatorFailed) and job.state is JobState.STARTING:
            error = msg.error.strip()
            worker.failure = f"{msg.name} failed: {error.splitlines()[-1] if error else '?'}"
            worker.failed_step = msg.name
            log.warning("worker %d [%s] failed %s:\n%s", worker.pid, job.handle, msg.name, error)
            self._kill_corrupt(worker)
        else:
            self._misbehaved(worker, f"sent an unexpected {msg.KIND} message")

    def _misbehaved(self, worker: Worker, what: str) -> None:
        worker.failure = worker.failure or what
        log.error("worker %d [%s] %s; killing it", worker.pid, worker.job.handle, what)
        worker.signal(signal.SIGKILL)

    def _on_ready(self, worker: Worker) -> None:
        job = worker.job
        if job.state is not JobState.STARTING:
            return
        worker.ready_at = time.monotonic()
        job.state = JobState.RUNNING
        job.cancel_timers()
        self.fleet.child_healthy(worker.zygote)
        self.clients.on_started(job)
        if job.spawn.timeout is not None:
            job.timers.append(self.loop.later(job.spawn.timeout, self._task_overdue, worker))
        log.debug(
            "worker %d [%s] ready in %.1f ms",
            worker.pid,
            job.handle,
            (worker.ready_at - worker.requested) * 1000,
        )

    def _close_channel(self, worker: Worker) -> None:
        if worker.channel_open:
            worker.channel_open = False
            self.loop.unwatch(worker.channel.fileno())
            worker.channel.close()

    def _on_exit(self, worker: Worker) -> None:
        """Its pidfd turned readable: the process has exited."""
        if not worker.alive:
            return
        worker.alive = False
        self.slots -= 1
        self.loop.unwatch(worker.pidfd)
        os.close(worker.pidfd)
        # Whatever it wrote before dying is in the channel now: read it
        # before deciding anything from the exit, or a finished result
        # would be reported as lost.
        if worker.channel_open:
            self._on_channel(worker)
            self._close_channel(worker)
        if worker.status is None and worker.zygote.state is ZygoteState.DEAD:
            self._reap_orphan(worker)
        self._finish(worker)

    def _reap_orphan(self, worker: Worker) -> None:
        """The worker's zygote is gone: the worker became our child (we are
        the subreaper), unless the zygote reaped it and died before saying."""
        try:
            pid, status, usage = os.wait4(worker.pid, os.WNOHANG)
        except ChildProcessError:
            worker.status_lost = True
            return
        if pid:
            worker.status = status
            worker.rusage = (usage.ru_utime, usage.ru_stime, usage.ru_maxrss)

    def _finish(self, worker: Worker) -> None:
        if not worker.ended or self.workers.get(worker.pid) is not worker:
            return
        del self.workers[worker.pid]
        job = worker.job
        if worker.status is not None:
            code, sig, _ = wait_status_parts(worker.status)
            words = describe_wait_status(worker.status)
        else:
            code, sig, words = None, None, "ended (exit status lost with its zygote)"
        lifetime = time.monotonic() - worker.requested
        if job.state in (JobState.FORKING, JobState.STARTING):
            self._corrupt_child(worker, words)
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
        self.dispatch()

    def _corrupt_child(self, worker: Worker, words: str) -> None:
        """A child that ended before ready: count it against its step and its
        zygote, and try the job again."""
        step = worker.failed_step or worker.phase or "start-up"
        self.failures_by_step[step] += 1
        reason = worker.failure or f"worker {worker.pid} {words} before it was ready"
        if worker.phase and not worker.failure:
            reason += f" (in {worker.phase})"
        log.warning("worker %d [%s] %s; it was %s", worker.pid, worker.job.handle, reason, words)
        self._start_failed(worker.job, reason, worker.zygote)

    # -- stopping -------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Refuse what waits in the queue; running and starting workers go on."""
        self.stopping = reason
        while self.queue:
            self._fail(self.queue.popleft(), SHUTTING_DOWN, f"server shutting down: {reason}")

    def terminate(self, sig: int) -> int:
        """Signal every live worker; how many there were."""
        alive = [worker for worker in self.workers.values() if worker.alive]
        for worker in alive:
            worker.signal(sig)
        return len(alive)

    def stats(self) -> dict[str, Any]:
        return {
            "workers": len(self.workers),
            "queued": len(self.queue),
            "accepted": self.counts["accepted"],
            "completed": self.counts["completed"],
            "failed_starts": self.counts["failed_starts"],
            "validator_failures": dict(self.failures_by_step),
        }
