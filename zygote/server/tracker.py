"""Watching the children zygotes fork: their channels, their deadlines, their
exits, and their exit statuses.

Process-level mechanics only, for the spawner, which decides what each event
means for a job or the pool. It hears when a child is ready, when it sent its
result, when its process is gone (its slot is free), and when its exit status
is known. Exit statuses come from three places — the zygote that reaped its
child, our own wait4 on orphans re-parented to us (we are the subreaper), and
a zygote's death that took a status with it — and all of them are recorded
here, by `exit_status()` alone. Part of the supervisor process.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Protocol

import zmq

from ..codec import decode_channel, encode, frame
from ..config import ServerConfig, signal_by_name
from ..linux import child_pids, kill_child
from ..protocol import Message, Phase, Promote, ProtocolError, Ready, Result, ValidatorFailed
from .children import Child, ZygoteProc
from .cleanup import Cleanup
from .lifecycle import ChildState
from .loop import EventLoop
from .output import OutputHub

log = logging.getLogger("zygote.supervisor")
#: The most read from a child's stdout or stderr at once when it is done.
_DRAIN_LIMIT = 4 << 20

_PROMOTE_FRAME = frame(encode(Promote()))

Rusage = tuple[float, float, int]  # user and system CPU seconds, max RSS in KiB


class ChildEvents(Protocol):
    """What the tracker reports about children (to the spawner)."""

    def child_ready(self, child: Child) -> None: ...
    def child_result(self, child: Child, data: bytes) -> None: ...
    def child_exited(self, child: Child) -> None: ...
    def child_ended(self, child: Child) -> None: ...


class Tracker:
    def __init__(
        self,
        config: ServerConfig,
        loop: EventLoop,
        find_children: Callable[[], set[int]] = child_pids,
        cleanup: Cleanup | None = None,
        output: OutputHub | None = None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.find_children = find_children
        #: what a child leaves behind, killed when it exits (cleanup.py)
        self.cleanup = cleanup or Cleanup()
        #: where the children's stdout and stderr go (output.py); by default, the log
        self.output = output or OutputHub(lambda handle: None, lambda target, data: False)
        self.events: ChildEvents  # the spawner, which listens once it is built
        self.children: dict[int, Child] = {}  # forked and not yet ended, by pid
        self.kill_signal = signal_by_name(config.kill_signal)

    def listen(self, events: ChildEvents) -> None:
        self.events = events

    def track(self, child: Child) -> None:
        """Watch a child the zygote has just forked."""
        old = self.children.get(child.pid)
        if old is not None:
            # Its pid was reused, so it is long gone: another zygote's word of
            # its exit is still on the way. Settle it now, status unknown.
            old.status_lost = True
            if old.alive:
                self._on_exit(old)
            else:
                self._settle(old)
        self.children[child.pid] = child
        self.cleanup.child_forked(child)  # before it may run a task
        assert child.channel is not None
        self.loop.watch(child.channel.fileno(), lambda: self._on_channel(child))
        self.loop.watch(child.pidfd, lambda: self._on_exit(child))
        for stream, fd in child.output.fds.items() if child.output is not None else ():
            self.loop.watch(fd, functools.partial(self._on_output, child, stream))

    def send(self, child: Child, data: bytes) -> None:
        """Write to its channel; what the socket does not take now goes when
        it is writable again."""
        if child.channel is not None and not child.write(data):
            self.loop.modify(child.channel.fileno(), zmq.POLLIN | zmq.POLLOUT)

    def close_channel(self, child: Child) -> None:
        """Close our end: for a worker that sent its result, or a pool child,
        the cue to exit."""
        if child.channel is not None:
            self.loop.unwatch(child.channel.fileno())
            child.channel.close()
            child.channel = None

    def retire(self, child: Child) -> None:
        """Let an idle pool child go."""
        child.move(ChildState.RETIRING)
        self.close_channel(child)

    def promote(self, child: Child) -> tuple[socket.socket, int] | None:
        """Hand a refork candidate whose task succeeded its control socket as
        a zygote. It is no longer a child we watch: returns our end of that
        socket and its pidfd (the fleet's now); None if it is already gone."""
        assert child.channel is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # With our stdout and stderr (the zygotes'): its own are its job's.
            socket.send_fds(child.channel, [_PROMOTE_FRAME], [theirs.fileno(), 1, 2])
        except OSError:  # it died, or its channel is full: it just ends
            ours.close()
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        self.close_output(child)  # it takes the server's stdio back
        self.cleanup.promoted(child)
        self.close_channel(child)
        self.loop.unwatch(child.pidfd)
        child.cancel_timers()
        del self.children[child.pid]
        child.move(ChildState.PROMOTED)
        return ours, child.pidfd

    def fail_start(self, child: Child, failure: str, step: str) -> None:
        """Kill a child that failed its start-up; with SIGABRT, faulthandler
        prints where it was first. SIGKILL follows if that does not do it."""
        child.failure, child.failed_step = failure, step
        child.zygote.last_failure = f"worker {child.pid} {failure}"
        child.signal(self.kill_signal)
        if self.kill_signal != signal.SIGKILL:
            child.timers.append(
                self.loop.later(self.config.kill_grace, child.signal, signal.SIGKILL)
            )

    def time_limit(self, child: Child, seconds: float, what: str) -> None:
        """SIGTERM the worker after `seconds` unless it has sent its result;
        SIGKILL after the grace period."""
        child.timers.append(self.loop.later(seconds, self._overdue, child, seconds, what))

    def _overdue(self, child: Child, seconds: float, what: str) -> None:
        if child.state is not ChildState.RUNNING:
            return
        child.timed_out = True
        log.warning(
            "worker %d %s ran past its %gs timeout; sending SIGTERM", child.pid, what, seconds
        )
        child.signal(signal.SIGTERM)
        child.timers.append(self.loop.later(self.config.kill_grace, child.signal, signal.SIGKILL))

    def terminate(self, sig: int) -> int:
        """Signal every live child (workers and ready-pool children); how many."""
        alive = [child for child in self.children.values() if child.alive]
        for child in alive:
            child.signal(sig)
        return len(alive)

    # -- exit statuses ----------------------------------------------------------

    def exit_status(
        self, pid: int, status: int, rusage: Rusage, zygote: ZygoteProc | None = None
    ) -> bool:
        """A child's exit status arrived: from its zygote, which reaped it, or
        from our own wait (`zygote` None). False if it is not one of ours."""
        child = self.children.get(pid)
        if child is None:
            return False
        if zygote is not None and child.zygote is not zygote:
            # A late word from another zygote about a child of its that had
            # this pid, already settled (status lost) when the pid came back.
            log.debug("zygote %d reaped process %d, no longer its child", zygote.pid, pid)
            return True
        child.status, child.rusage = status, rusage
        if child.alive:
            self._on_exit(child)
        else:
            self._settle(child)
        return True

    def _reap_orphan(self, child: Child) -> None:
        """Its zygote is gone: it became our child (we are the subreaper) and
        is ours to reap — unless the zygote reaped it and died before saying."""
        try:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        except ChildProcessError:
            child.status_lost = True
            self._settle(child)
            return
        if pid:
            self.exit_status(pid, status, (usage.ru_utime, usage.ru_stime, usage.ru_maxrss))

    def zygote_gone(self, zygote: ZygoteProc, known: set[int]) -> None:
        """Once a dead zygote is reaped its children are ours (we are the
        subreaper). Children of it that already exited are ours to reap now
        (or their status went with it). And a child it forked but never told
        us about — it died between fork() and saying so — is killed: it was
        never handed a task, and no deadline of ours covers it."""
        if not zygote.reaped:
            return
        for child in list(self.children.values()):
            if child.zygote is zygote and child.state is ChildState.EXITED:
                self._reap_orphan(child)
        for pid in self.find_children() - known - self.children.keys() - self.cleanup.own():
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

    # -- events ---------------------------------------------------------------

    def _on_channel(self, child: Child) -> None:
        if child.channel is None:
            return
        if child.outbox and child.flush():
            self.loop.modify(child.channel.fileno(), zmq.POLLIN)
        try:
            frames, closed = child.read()
        except ProtocolError as exc:
            frames, closed = [], True
            self._misbehaved(child, f"sent an oversized frame: {exc}")
        for data in frames:
            try:
                msg = decode_channel(data)
            except ProtocolError as exc:
                self._misbehaved(child, f"sent garbage: {exc}")
                break
            self._on_message(child, msg, data)
        if closed:
            self.close_channel(child)

    def _on_message(self, child: Child, msg: Message, data: bytes) -> None:
        starting = child.state is ChildState.STARTING
        if isinstance(msg, Phase) and starting:
            child.phase = msg.name
        elif isinstance(msg, Ready) and starting:
            # Ready to take a task, once it is in its cgroup (cleanup.py).
            self.cleanup.when_placed(child, lambda: self._ready(child))
        elif isinstance(msg, Result) and child.state is ChildState.RUNNING:
            if child.job is None or msg.handle != child.job.handle:
                self._misbehaved(child, f"sent a result for {msg.handle!r}")
                return
            self._drain_output(child)  # what it printed comes before its result
            child.move(ChildState.FINISHING)
            self.events.child_result(child, data)
            if not child.alive:  # promoted to a zygote: no longer ours
                return
            self.close_channel(child)  # the worker's cue to exit
            # ... which it takes once its before_exit hooks are done, unless
            # something in it hangs (a hook stuck where SIGALRM cannot reach,
            # a flush to a full pipe): it does not keep its slot for that.
            grace = self.config.exit_timeout + self.config.kill_grace
            child.timers.append(self.loop.later(grace, child.signal, signal.SIGKILL))
        elif isinstance(msg, ValidatorFailed) and starting:
            error = msg.error.strip()
            log.warning("worker %d [%s] failed %s:\n%s", child.pid, child.name, msg.name, error)
            last = error.splitlines()[-1] if error else "?"
            self.fail_start(child, f"{msg.name} failed: {last}", msg.name)
            child.zygote.last_failure = f"worker {child.pid} {msg.name} failed: {last}\n{error}"
        else:
            self._misbehaved(child, f"sent an unexpected {msg.KIND} message")

    def _ready(self, child: Child) -> None:
        # Not from a child condemned, or gone, while it was being moved.
        if child.state is ChildState.STARTING and child.failure is None:
            self.events.child_ready(child)

    def _on_output(self, child: Child, stream: str, budget: int = 1 << 20) -> None:
        """Its stdout or stderr turned readable: pass on what is there."""
        capture = child.output
        if capture is None or stream not in capture.fds:
            return
        if child.state is ChildState.STARTING:
            # A task that came with its fork runs right after the child's
            # Ready: take that in first, so that its output is its job's.
            self._on_channel(child)
        data, closed = capture.read(stream, budget)
        if data:
            self.output.received(child, stream, data)
        if closed:
            self.loop.unwatch(capture.fds[stream])
            capture.close(stream)
            self.output.closed(child, stream)

    def _drain_output(self, child: Child) -> None:
        """Read its stdout and stderr dry (what it wrote so far is there), up to
        a bound: a task's leftover processes may keep writing, and the loop
        must not read forever (a pipe holds at most 1 MiB)."""
        for stream in list(child.output.fds) if child.output is not None else ():
            self._on_output(child, stream, _DRAIN_LIMIT)

    def close_output(self, child: Child) -> None:
        """Read its stdout and stderr dry, and close them: its process is
        gone (what its task left behind is killed with it), or promoted."""
        self._drain_output(child)
        capture = child.output
        for stream in list(capture.fds) if capture is not None else ():
            self.loop.unwatch(capture.fds[stream])  # type: ignore[union-attr]
            capture.close(stream)  # type: ignore[union-attr]
            self.output.closed(child, stream)

    def _misbehaved(self, child: Child, what: str) -> None:
        child.failure = child.failure or what
        log.error("worker %d [%s] %s; killing it", child.pid, child.name, what)
        child.signal(signal.SIGKILL)

    def _on_exit(self, child: Child) -> None:
        """Its pidfd turned readable (or its status came first): it has exited."""
        if not child.alive or child.pidfd < 0:  # handled, or being handled
            return
        self.loop.unwatch(child.pidfd)
        os.close(child.pidfd)
        # From here on nothing signals it (its pidfd number may be another
        # process's soon), even what its last messages below may ask for.
        child.pidfd = -1
        # Whatever it wrote before dying is in the channel now: read it
        # before deciding anything from the exit, or a finished result
        # would be reported as lost. Its output first, as it was written.
        self._drain_output(child)
        self._on_channel(child)
        self.close_channel(child)
        self.close_output(child)
        self.cleanup.child_exited(child)  # what its task left behind goes too
        child.cancel_timers()
        child.move(ChildState.EXITED)
        self.events.child_exited(child)
        # Only once its zygote is reaped is an orphan ours to reap (before
        # that, it is still the zygote's child, and wait4 would fail).
        if child.status is None and child.zygote.reaped:
            self._reap_orphan(child)
        else:
            self._settle(child)

    def _settle(self, child: Child) -> None:
        """It has exited and its status is known (or lost): report it, once."""
        known = child.status is not None or child.status_lost
        if known and self.children.get(child.pid) is child:
            del self.children[child.pid]
            child.move(ChildState.ENDED)
            self.events.child_ended(child)
