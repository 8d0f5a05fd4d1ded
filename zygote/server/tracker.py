"""Watching worker processes: their channels, their deadlines, their exits.

Process-level mechanics only, for the spawner, which decides what each event
means for a job or the pool: it hears when a worker is ready, when it sent
its result, when its process is gone, and when its exit status is known.
Part of the supervisor process.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Protocol

import zmq

from ..codec import decode_channel
from ..config import ServerConfig, signal_by_name
from ..linux import child_pids, kill_child
from ..protocol import Message, Phase, ProtocolError, Ready, Result, ValidatorFailed
from .children import Worker, ZygoteProc
from .loop import EventLoop

log = logging.getLogger("zygote.supervisor")


class WorkerEvents(Protocol):
    def on_ready(self, worker: Worker) -> None: ...
    def on_result(self, worker: Worker, data: bytes) -> None: ...
    def on_gone(self, worker: Worker) -> None: ...
    def on_ended(self, worker: Worker) -> None: ...


class Tracker:
    def __init__(self, config: ServerConfig, loop: EventLoop, events: WorkerEvents) -> None:
        self.config = config
        self.loop = loop
        self.events = events
        self.workers: dict[int, Worker] = {}
        self.kill_signal = signal_by_name(config.kill_signal)

    def track(self, worker: Worker) -> None:
        old = self.workers.get(worker.pid)
        if old is not None:
            # Its pid was reused, so it is long gone: another zygote's word of
            # its exit is still on the way. Settle it now, status unknown.
            old.status_lost = True
            if old.alive:
                self._on_exit(old)
            else:
                self._settle(old)
        self.workers[worker.pid] = worker
        self.loop.watch(worker.channel.fileno(), lambda: self._on_channel(worker))
        self.loop.watch(worker.pidfd, lambda: self._on_exit(worker))

    def send(self, worker: Worker, data: bytes) -> None:
        """Write to its channel; what the socket does not take now goes when
        it is writable again."""
        if worker.channel_open and not worker.write(data):
            self.loop.modify(worker.channel.fileno(), zmq.POLLIN | zmq.POLLOUT)

    def close_channel(self, worker: Worker) -> None:
        if worker.channel_open:
            worker.channel_open = False
            self.loop.unwatch(worker.channel.fileno())
            worker.channel.close()

    def fail_start(self, worker: Worker, failure: str, step: str) -> None:
        """Kill a child that failed its start-up; with SIGABRT, faulthandler
        prints where it was first. SIGKILL follows if that does not do it."""
        worker.failure, worker.failed_step = failure, step
        worker.signal(self.kill_signal)
        if self.kill_signal != signal.SIGKILL:
            self.loop.later(self.config.kill_grace, worker.signal, signal.SIGKILL)

    def time_limit(self, worker: Worker, seconds: float, what: str) -> None:
        """SIGTERM the worker after `seconds` unless it has sent its result;
        SIGKILL after the grace period."""
        worker.timers.append(self.loop.later(seconds, self._overdue, worker, seconds, what))

    def _overdue(self, worker: Worker, seconds: float, what: str) -> None:
        if not worker.alive or worker.result_seen:
            return
        worker.timed_out = True
        log.warning(
            "worker %d %s ran past its %gs timeout; sending SIGTERM", worker.pid, what, seconds
        )
        worker.signal(signal.SIGTERM)
        self.loop.later(self.config.kill_grace, worker.signal, signal.SIGKILL)

    def reaped(self, pid: int, status: int, rusage: tuple[float, float, int]) -> bool:
        """An exit status arrived (from its zygote, or from our own wait)."""
        worker = self.workers.get(pid)
        if worker is None:
            return False
        worker.status = status
        worker.rusage = rusage
        if worker.alive:
            self._on_exit(worker)
        else:
            self._settle(worker)
        return True

    def zygote_gone(self, zygote: ZygoteProc, known: set[int]) -> None:
        """Once a dead zygote is reaped its children are ours (we are the
        subreaper). Workers of it that already ended are ours to reap now (or
        their status went with it). And a child it forked but never told us
        about — it died between fork() and saying so — is killed: it was never
        handed a task, and no deadline of ours covers it."""
        if not zygote.reaped:
            return
        for worker in list(self.workers.values()):
            if worker.zygote is zygote and not worker.alive:
                if worker.status is None:
                    worker.reap_orphan()
                self._settle(worker)
        for pid in child_pids() - known - self.workers.keys():
            if pid == zygote.helper_pid:  # the next zygote starts its own
                log.info(
                    "killing the helper (pid %d) of zygote generation %d, which is gone",
                    pid,
                    zygote.generation,
                )
            else:
                log.warning(
                    "killing process %d: forked by zygote generation %d, never handed over",
                    pid,
                    zygote.generation,
                )
            kill_child(pid)

    def terminate(self, sig: int) -> int:
        """Signal every live child (workers and ready-pool children); how many."""
        alive = [worker for worker in self.workers.values() if worker.alive]
        for worker in alive:
            worker.signal(sig)
        return len(alive)

    # -- events ---------------------------------------------------------------

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
            self.close_channel(worker)

    def _on_message(self, worker: Worker, msg: Message, data: bytes) -> None:
        starting = worker.ready_at is None
        if isinstance(msg, Phase) and starting:
            worker.phase = msg.name
        elif isinstance(msg, Ready) and starting:
            if worker.failure is None:  # not from a child already condemned
                self.events.on_ready(worker)
        elif isinstance(msg, Result) and msg.handle == worker.job.handle and not starting:
            if not worker.result_seen:
                worker.result_seen = True
                self.events.on_result(worker, data)
                self.close_channel(worker)  # the worker's cue to exit
                # ... which it takes once its before_exit hooks are done,
                # unless something in it hangs (a hook stuck where SIGALRM
                # cannot reach, a flush to a full pipe): it does not keep its
                # slot for that.
                grace = self.config.exit_timeout + self.config.kill_grace
                worker.timers.append(self.loop.later(grace, worker.signal, signal.SIGKILL))
        elif isinstance(msg, ValidatorFailed) and starting:
            error = msg.error.strip()
            log.warning(
                "worker %d [%s] failed %s:\n%s", worker.pid, worker.job.handle, msg.name, error
            )
            last = error.splitlines()[-1] if error else "?"
            self.fail_start(worker, f"{msg.name} failed: {last}", msg.name)
        else:
            self._misbehaved(worker, f"sent an unexpected {msg.KIND} message")

    def _misbehaved(self, worker: Worker, what: str) -> None:
        worker.failure = worker.failure or what
        log.error("worker %d [%s] %s; killing it", worker.pid, worker.job.handle, what)
        worker.signal(signal.SIGKILL)

    def _on_exit(self, worker: Worker) -> None:
        """Its pidfd turned readable: the process has exited."""
        if not worker.alive:
            return
        worker.alive = False
        self.loop.unwatch(worker.pidfd)
        os.close(worker.pidfd)
        # Whatever it wrote before dying is in the channel now: read it
        # before deciding anything from the exit, or a finished result
        # would be reported as lost.
        if worker.channel_open:
            self._on_channel(worker)
            self.close_channel(worker)
        for timer in worker.timers:
            timer.cancel()
        self.events.on_gone(worker)
        # Only once its zygote is reaped is an orphan ours to reap (before
        # that, it is still the zygote's child, and wait4 would fail).
        if worker.status is None and worker.zygote.reaped:
            worker.reap_orphan()
        self._settle(worker)

    def _settle(self, worker: Worker) -> None:
        if worker.ended and self.workers.get(worker.pid) is worker:
            del self.workers[worker.pid]
            self.events.on_ended(worker)
