"""From an accepted request to a finished worker: the queue, fork requests
(or a child from the ready pool), start-up deadlines, replacement of corrupt
children and retries. How a job leaves — its outcome and exit, decoded in
words, or its failure — is `endings.py`'s. The processes themselves are
watched by the tracker, the zygotes by the fleet; the spawner hears from
both. Part of the supervisor process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
from typing import Any

from ..codec import GO_FRAME
from ..config import ServerConfig
from ..linux import send_signal
from ..protocol import (
    ErrorCode,
    Fork,
    Forked,
    ForkFailed,
    shutting_down,
    spawn_size,
)
from . import outcomes
from .children import Child, Job, ZygoteProc
from .cleanup import Cleanup, effective_limits
from .endings import Endings
from .fleet import Fleet
from .lifecycle import ChildState, JobState, Slots
from .lineage import Lineage
from .loop import EventLoop
from .outcomes import Clients
from .pool import ReadyPool
from .tracker import Tracker

log = logging.getLogger("zygote.supervisor")

#: Tasks whose arguments fit in this travel with the fork request, so the
#: child finds them decoded in memory; bigger ones go down the channel.
CARRY_LIMIT = 64 * 1024


class Spawner:
    def __init__(
        self,
        config: ServerConfig,
        loop: EventLoop,
        fleets: dict[str, Fleet],
        tracker: Tracker,
        clients: Clients,
        cleanup: Cleanup | None = None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.tracker = tracker
        self.cleanup = cleanup or Cleanup()
        self.clients = clients
        self.jobs: dict[str, Job] = {}
        self.slots = Slots(config.max_workers)  # counted by the children's moves
        self.stopping: str | None = None
        self.counts = outcomes.Counts()
        self.endings = Endings(config, loop, clients, self.jobs, self.counts)
        self.lineages: dict[str, Lineage] = {}
        for name, fleet in fleets.items():
            fork = functools.partial(self._fork_for_pool, fleet)
            pool = ReadyPool(config.prefork, loop, fork, tracker.retire)
            self.lineages[name] = Lineage(name, fleet, pool)
            fleet.listen(self)
        tracker.listen(self)

    def _of(self, zygote: ZygoteProc) -> Lineage:
        return self.lineages[zygote.profile]

    @property
    def queued(self) -> int:
        return sum(len(lineage.queue) for lineage in self.lineages.values())

    # -- requests -----------------------------------------------------------

    def full(self) -> bool:
        """No room in the queue. (It only fills when every slot is taken.)"""
        return self.queued >= self.config.queue_size

    def submit(self, job: Job) -> None:
        """Queue an accepted job (its profile checked by the caller)."""
        job.limits = effective_limits(self.config, job.spawn.limits)
        self.jobs[job.handle] = job
        self.lineages[job.profile].queue.append(job)
        self.counts["accepted"] += 1
        self.dispatch()

    def kill(self, handle: str, sig: int) -> int | None:
        """Signal the worker running `handle`: its pid; 0 if it had none yet
        (then it never starts); None if there is no such job."""
        job = self.jobs.get(handle)
        if job is None:
            return None
        if job.state is not JobState.RUNNING:
            job.killed = sig  # whatever becomes of its start, it is not retried
        if job.state is JobState.QUEUED:
            self.lineages[job.profile].queue.remove(job)
            self._retry(job, "")
            return 0
        child = job.child
        if child is not None and child.signal(sig):
            return child.pid
        return 0 if job.killed else None

    def dispatch(self) -> None:
        """Start queued jobs while there are free slots, one lineage's after
        another's: on a child from its ready pool if there is one, else on a
        new fork."""
        started = True
        while started and self.slots.free:
            started = False
            for lineage in self.lineages.values():
                if lineage.queue and self.slots.free and self._start_next(lineage):
                    started = True

    def _start_next(self, lineage: Lineage) -> bool:
        """Start the first job in `lineage`'s queue; False if it cannot now."""
        child = lineage.pool.take(lineage.fleet.current)
        if child is not None:
            self._assign(child, lineage.queue.popleft())
            return True
        zygote = lineage.fleet.ready
        if zygote is None or not self._fork_for_job(zygote, lineage.queue[0]):
            return False
        lineage.queue.popleft()
        return True

    def _fork_for_job(self, zygote: ZygoteProc, job: Job) -> bool:
        spawn = job.spawn
        # A fork request must stay small (the zygote reads a bounded buffer):
        # a task too big to travel with it, env and cwd included, goes down
        # the worker's channel.
        carried = spawn_size(spawn.task, spawn.payload, spawn.env, spawn.cwd) <= CARRY_LIMIT
        candidate = self._candidate_wanted(zygote, job)
        request = Fork(job.handle, candidate=candidate)
        if carried:
            limits = self.cleanup.worker_limits(job.limits) or None
            go = not self.cleanup.supervisor_go  # else sent once it is in its cgroup
            request = Fork(
                job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd, candidate, limits, go
            )
        child = self._fork(zygote, request, job)
        if child is None:
            return False
        child.carried, child.candidate = carried, candidate
        job.child = child
        job.move(JobState.STARTING)
        return True

    def _candidate_wanted(self, zygote: ZygoteProc, job: Job) -> bool:
        """Is `job`, started on `zygote`, to be a refork candidate? Every job
        started while a refork is wanted is one — the first to finish well
        is promoted, the others just end — but not one with its own `_env`
        or `_cwd`: a zygote made from it would hand them to every worker."""
        spawn = job.spawn
        return not spawn.env and not spawn.cwd and self._of(zygote).fleet.wants_refork(zygote)

    def _fork_for_pool(self, fleet: Fleet, name: str) -> Child | None:
        zygote = fleet.ready
        if zygote is None or self.stopping:
            return None
        return self._fork(zygote, Fork(name), None)

    def _fork(self, zygote: ZygoteProc, request: Fork, job: Job | None) -> Child | None:
        if not self._of(zygote).fleet.send_fork(zygote, request):
            return None
        child = Child(request.handle, zygote, self.slots, job, requested=self.loop.now())
        zygote.pending[child.name] = child
        # Both deadlines are armed before the fork: a child that deadlocks
        # after it never reports anything, so only the parent side can tell.
        child.timers = [
            self.loop.later(self.config.fork_timeout, self._fork_overdue, child),
            self.loop.later(self.config.validate_timeout, self._ready_overdue, child),
        ]
        return child

    def _assign(self, child: Child, job: Job) -> None:
        """Hand a ready pool child its task: it runs the moment it reads it."""
        child.candidate = self._candidate_wanted(child.zygote, job)
        child.take(job)
        child.requested = self.loop.now()
        # Answer the client first: measured, writing the task first made the
        # child's wake-up compete with the reply, slowing both.
        self._running(child, job)
        self.cleanup.limit(child, job.limits)
        self.tracker.send(child, self._task_frame(child, job))
        job.move(JobState.RUNNING)  # drops its arguments: after the reply, not before
        log.debug("spawn %s %s: pool worker %d", job.handle, job.spawn.task, child.pid)

    def _task_frame(self, child: Child, job: Job) -> bytes:
        limits = self.cleanup.worker_limits(job.limits)
        return outcomes.task_frame(job, child.candidate, limits)

    def _running(self, child: Child, job: Job) -> None:
        """The job has a ready worker: answer its clients, start its clock."""
        self.clients.job_started(job.handle, child.pid, child.generation, child.warnings)
        child.zygote.spawns += 1
        if job.spawn.timeout is not None:
            self.tracker.time_limit(child, job.spawn.timeout, f"[{job.handle}] {job.spawn.task}")

    # -- what zygotes report (fleet.ZygoteEvents) -----------------------------

    def zygote_ready(self, zygote: ZygoteProc) -> None:
        lineage = self._of(zygote)
        lineage.pool.retire_stale(lineage.fleet.current)
        self.dispatch()
        lineage.pool.refill()

    def probe(self, zygote: ZygoteProc) -> None:
        """Fork a child of a booted next generation: it takes over once this
        child has passed the validators (then joins the pool, or leaves)."""
        child = self._fork(zygote, Fork(f"probe:{zygote.generation}"), None)
        if child is None:
            why = "it did not take the fork request for its probe"
            self._of(zygote).fleet.kill_zygote(zygote, why)
        else:
            child.probe = True

    def forked(self, zygote: ZygoteProc, msg: Forked, fds: list[int]) -> None:
        child = zygote.pending.get(msg.handle)
        if len(fds) not in (2, 4):  # the channel, a pidfd, and its stdout and stderr
            for fd in fds:
                os.close(fd)
            self._of(zygote).fleet.condemn(zygote, f"sent {len(fds)} descriptors with a fork reply")
            if child is not None and child.job is not None and child.carried:
                self._lost_carried(zygote, child, child.job, msg.pid)
            # Otherwise the child stays pending and its job is queued again
            # when the zygote goes: the child never got its task, and exits
            # when it finds its channel's other end gone.
            return
        zygote.pending.pop(msg.handle, None)
        channel_fd, pidfd, *stdio = fds
        if child is None or child.state is not ChildState.FORKING:
            # We gave up on this fork already; the child must not run.
            send_signal(pidfd, signal.SIGKILL)
            for fd in fds:
                os.close(fd)
            return
        self.counts.guards(msg.guard_wait, bool(msg.guards_missed))
        channel = socket.socket(fileno=channel_fd)
        channel.setblocking(False)
        child.timers[0].cancel()  # the fork deadline; the ready one stays
        child.forked(msg.pid, pidfd, channel, self.config.max_message_bytes + 65536, stdio)
        child.warnings = list(msg.warnings)
        self.tracker.track(child)
        job = child.job
        if job is None:
            return
        if job.killed is not None:  # killed while it was being forked
            child.signal(job.killed)
            return
        self.cleanup.when_placed(child, lambda: self._go(child, job))
        log.debug("spawn %s: worker %d of generation %d", job.handle, child.pid, zygote.generation)

    def _go(self, child: Child, job: Job) -> None:
        """A child forked for `job` is in its place: it may run the task."""
        if child.state is not ChildState.STARTING or child.job is not job:
            return  # it failed its start, or was killed, meanwhile
        if not child.carried:
            self.tracker.send(child, self._task_frame(child, job))
        elif self.cleanup.supervisor_go:  # else the zygote has said it
            self.tracker.send(child, GO_FRAME)

    def _go_again(self, child: Child) -> None:
        if child.state in (ChildState.STARTING, ChildState.RUNNING):
            self.tracker.send(child, GO_FRAME)

    def _lost_carried(self, zygote: ZygoteProc, child: Child, job: Job, pid: int) -> None:
        """The zygote has told this child to go, so it may be running its task
        right now, and we cannot watch it: running the task again could run
        it twice. Stop it and give up on the request instead. (The pid is
        still that child's: its zygote has not reaped it.)"""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        del zygote.pending[child.name]
        child.cancel_timers()
        child.move(ChildState.ENDED)
        text = f"worker {pid} was forked, but the supervisor lost its descriptors (out of "
        text += "file descriptors?); killed, and as its task may have started, not run again"
        log.error("spawn %s %s: %s", job.handle, job.spawn.task, text)
        self.endings.failed(job, ErrorCode.SPAWN_FAILED, text)

    def fork_failed(self, zygote: ZygoteProc, msg: ForkFailed) -> None:
        child = zygote.pending.pop(msg.handle, None)
        if child is None or child.state is not ChildState.FORKING:
            return
        child.cancel_timers()
        child.move(ChildState.ENDED)
        job = child.job
        lineage = self._of(zygote)
        if child.probe:
            lineage.fleet.kill_zygote(zygote, f"it could not fork its probe child: {msg.error}")
        elif job is None:  # a pool fork
            self.counts["refused_forks" if msg.refused else "failed_starts"] += 1
            lineage.pool.fork_failed(child, msg.error, msg.refused)
        elif msg.refused:  # the thread policy: retrying cannot help
            self.counts["refused_forks"] += 1
            log.error("spawn %s: %s", job.handle, msg.error)
            self.endings.failed(job, ErrorCode.SPAWN_FAILED, msg.error)
            self.dispatch()
        else:
            self._start_failed(job, msg.error, zygote)

    def zygote_gone(self, zygote: ZygoteProc) -> None:
        pool = self._of(zygote).pool
        for child in reversed(list(zygote.pending.values())):
            child.cancel_timers()
            child.move(ChildState.ENDED)
            if child.job is None:
                pool.replace(child)
                continue
            # Never forked, or forked into a child that will see its channel
            # close and exit without running anything: safe to run again. It
            # counts as an attempt all the same, so that a request that kills
            # every zygote it meets ends in an error, not in a loop.
            job = child.job
            job.attempts += 1
            self._retry(job, f"zygote generation {zygote.generation} was lost while forking it")
        zygote.pending.clear()
        for child in list(self.tracker.children.values()):
            if child.zygote is not zygote:
                continue
            if child.state is ChildState.IDLE:  # the old generation's code: let it go
                pool.retire(child)
            elif child.carried and child.state in (ChildState.STARTING, ChildState.RUNNING):
                # It may have died between handing us the channel and
                # telling the child to go (which may be ready, and waiting
                # for it, by now); one more Go is harmless, once it is in
                # its cgroup.
                self.cleanup.when_placed(child, functools.partial(self._go_again, child))
        zygotes = {pid for lineage in self.lineages.values() for pid in lineage.fleet.zygotes}
        self.tracker.zygote_gone(zygote, zygotes)
        self.dispatch()  # what it held may have freed slots

    def _fork_overdue(self, child: Child) -> None:
        if child.state is ChildState.FORKING:
            why = f"did not answer a fork request within {self.config.fork_timeout:g}s"
            self._of(child.zygote).fleet.kill_zygote(child.zygote, why)

    def _ready_overdue(self, child: Child) -> None:
        if child.state is ChildState.FORKING:
            self._fork_overdue(child)
        elif child.state is ChildState.STARTING:
            where = f" (stuck in {child.phase})" if child.phase else ""
            failure = f"not ready within {self.config.validate_timeout:g}s{where}"
            self.tracker.fail_start(child, failure, child.phase or "start-up")

    # -- start failures ---------------------------------------------------------

    def _start_failed(self, job: Job, reason: str, zygote: ZygoteProc) -> None:
        """A start attempt failed: retry the job, or give up and tell the client.
        A failure reported after its zygote was replaced does not count
        against the request: the zygote, not the request, was the problem."""
        self.counts["failed_starts"] += 1
        fleet = self._of(zygote).fleet
        if zygote is fleet.current and job.killed is None:
            job.attempts += 1
            fleet.child_corrupt(zygote)
        self._retry(job, reason)
        self.dispatch()

    def _retry(self, job: Job, reason: str) -> None:
        """Queue a job whose start failed again, first in line, unless it
        fails now (killed, out of attempts, or the server is stopping)."""
        if not self.endings.give_up(job, reason, self.stopping):
            job.move(JobState.QUEUED)
            self.lineages[job.profile].queue.appendleft(job)

    # -- what the tracker reports (tracker.ChildEvents) -----------------------

    def child_ready(self, child: Child) -> None:
        child.ready_at = self.loop.now()
        child.cancel_timers()
        fleet, pool = self._of(child.zygote).fleet, self._of(child.zygote).pool
        fleet.child_healthy(child.zygote)
        job = child.job
        if child.probe:  # its generation is sound: it takes over, and the
            pool.add(child)  # probe joins the new pool (if it has room)
            fleet.probe_passed(child.zygote)
            pool.trim(fleet.current)
            return
        if job is None:
            pool.add(child)
            if self.stopping:  # forked before the stop, ready after it
                pool.retire(child)
            pool.retire_stale(fleet.current)
            self.dispatch()
            return
        child.move(ChildState.RUNNING)
        self._running(child, job)
        job.move(JobState.RUNNING)  # drops its arguments: after the reply, not before
        ready_ms = (child.ready_at - child.requested) * 1000
        log.debug("worker %d [%s] ready in %.1f ms", child.pid, job.handle, ready_ms)

    def child_result(self, child: Child, data: bytes) -> None:
        job = child.job
        assert job is not None
        self.clients.job_result(job.handle, data)
        job.raised = outcomes.raised(job.handle, data)
        # A candidate whose task succeeded, while a refork is still wanted:
        # instead of exiting, it becomes the next generation.
        fleet = self._of(child.zygote).fleet
        if child.candidate and fleet.wants_refork(child.zygote) and outcomes.succeeded(data):
            self._promote(child, job)

    def _promote(self, child: Child, job: Job) -> None:
        handover = self.tracker.promote(child)
        if handover is None:
            return
        control, pidfd = handover
        zygote = self._of(child.zygote).fleet.adopt(child.pid, pidfd, control, child.zygote)
        # Its job is over; its process goes on as a zygote. Its slot is free
        # for the next job, which the old generation serves until the switch.
        self.endings.ended(job, child, 0, None, f"became zygote generation {zygote.generation}")
        self.dispatch()

    def child_exited(self, child: Child) -> None:
        if child.exited_from is ChildState.IDLE:
            self._of(child.zygote).pool.replace(child)
        elif child.job is not None:  # its slot is free (its move said so)
            self.dispatch()

    def child_ended(self, child: Child) -> None:
        code, sig, words = child.exit_status()
        if child.exited_from is ChildState.STARTING:
            self._corrupt_child(child, words)
            return
        job = child.job
        if job is None:  # a pool child that never got a task
            if child.exited_from is ChildState.IDLE:
                log.warning("pool worker %d %s while waiting for a task", child.pid, words)
            return
        result = None
        if child.exited_from is ChildState.RUNNING:  # no result came
            result = outcomes.missing_result(job, child, code, sig, words)
        self.endings.ended(job, child, code, sig, words, result)

    def _corrupt_child(self, child: Child, words: str) -> None:
        """A child that ended before ready: count it against its step and its
        zygote, and try the job again (or fork another pool child)."""
        step = child.failed_step or child.phase or "start-up"
        if child.job is None or child.job.killed is None:  # not the child's fault
            self.counts.by_step[step] += 1
        reason = child.failure or f"worker {child.pid} {words} before it was ready"
        if child.phase and not child.failure:
            reason += f" (in {child.phase})"
        log.warning("worker %d [%s] %s; it was %s", child.pid, child.name, reason, words)
        if child.job is not None:
            self._start_failed(child.job, reason, child.zygote)
            return
        self.counts["failed_starts"] += 1
        lineage = self._of(child.zygote)
        if child.probe:  # the generation it was to check does not serve
            lineage.fleet.kill_zygote(child.zygote, f"its probe child failed: {reason}")
            return
        if child.zygote is lineage.fleet.current:
            lineage.fleet.child_corrupt(child.zygote)
        lineage.pool.replace(child)

    def stop(self, reason: str) -> None:
        """Refuse what waits in the queue; running and starting workers go on."""
        self.stopping = reason
        for lineage in self.lineages.values():
            lineage.pool.retire_all()
            while lineage.queue:
                self.endings.failed(
                    lineage.queue.popleft(), ErrorCode.SHUTTING_DOWN, shutting_down(reason)
                )

    def stats(self) -> dict[str, Any]:
        return {
            "workers": sum(child.job is not None for child in self.tracker.children.values()),
            "queued": self.queued,
            **self.counts.stats(),
        }
