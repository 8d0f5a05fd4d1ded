"""The supervisor's view of its children: zygote processes, workers, and the
jobs they serve. State and non-blocking socket plumbing only; decisions
about them live in the fleet (zygotes) and the spawner (jobs and workers).
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..codec import FrameDecoder, decode_control
from ..linux import describe_wait_status, send_signal, wait_status_parts
from ..protocol import Control, Forked, ProtocolError, Spawn
from .store import Record
from .timers import Timer

_RECV_CHUNK = 1 << 18
#: Control messages are small (a fork request carries at most CARRY_LIMIT);
#: anything longer is a protocol error, not a reason to allocate more.
_CONTROL_MAX = 1 << 17


class JobState(enum.Enum):
    QUEUED = "queued"  # waiting for a worker slot and a ready zygote
    FORKING = "forking"  # fork requested, the zygote has not answered yet
    STARTING = "starting"  # forked; hooks and validators running
    RUNNING = "running"  # ready; the task runs
    DONE = "done"


class ZygoteState(enum.Enum):
    BOOTING = "booting"
    READY = "ready"
    RETIRING = "retiring"  # control closed by us; it exits when it notices
    DEAD = "dead"


@dataclass(eq=False)
class Job:
    """One accepted spawn request, from the queue to its result."""

    handle: str
    spawn: Spawn
    record: Record
    state: JobState = JobState.QUEUED
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)
    zygote: ZygoteProc | None = None
    worker: Worker | None = None
    carried: bool = False  # the task travelled with the fork request
    requested: float = 0.0  # when the current fork was requested
    timers: list[Timer] = field(default_factory=list)

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


@dataclass(eq=False)
class PoolFork:
    """A child being forked for the ready pool: no task yet, until it is
    validated and handed one."""

    handle: str
    state: JobState = JobState.FORKING
    zygote: ZygoteProc | None = None
    worker: Worker | None = None
    requested: float = 0.0
    timers: list[Timer] = field(default_factory=list)

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


@dataclass(eq=False)
class ZygoteProc:
    generation: int
    process: subprocess.Popen[bytes]
    pidfd: int
    control: socket.socket
    started: float = field(default_factory=time.monotonic)
    state: ZygoteState = ZygoteState.BOOTING
    #: fork requests sent and not yet answered, by handle
    pending: dict[str, Job | PoolFork] = field(default_factory=dict)
    reaped: bool = False
    boot_timer: Timer | None = None
    healthy_children: int = 0
    corrupt_in_a_row: int = 0
    trouble: str | None = None  # why it is to be killed, once the current batch is done
    #: its latest thread report (one dict per kind of thread)
    threads: list[dict[str, Any]] = field(default_factory=list)
    #: its helper process (background functions), while it runs
    helper_pid: int | None = None
    helper_restarts: int = 0
    #: an eventfd counting background messages dropped (workers, helper)
    drops_fd: int | None = None

    @classmethod
    def start(cls, generation: int, lifeline_fd: int) -> ZygoteProc:
        """Exec a fresh interpreter as the zygote. Never fork the supervisor
        itself: it has ZeroMQ's threads, and it must not carry their state."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = (
            "import sys; from zygote.child.forkserver import main; "
            "main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))"
        )
        argv = [sys.executable, "-c", code, str(theirs.fileno()), str(lifeline_fd)]
        argv.append(str(os.getpid()))
        try:
            # Its own process group: a terminal's ^C reaches the supervisor
            # only, which then decides how workers stop.
            process = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(), lifeline_fd), process_group=0
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(generation, process, os.pidfd_open(process.pid), ours)

    @property
    def pid(self) -> int:
        return self.process.pid

    def receive(self) -> tuple[list[tuple[Control | str, list[int]]], bool]:
        """Every control message waiting, with the descriptors that came along
        (a message that cannot be used is replaced by what is wrong with it);
        and whether the zygote closed its end."""
        messages: list[tuple[Control | str, list[int]]] = []
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.control, _CONTROL_MAX, 4)
            except BlockingIOError:
                return messages, False
            except ConnectionResetError:
                return messages, True
            if not data and not fds:
                return messages, True
            if flags & socket.MSG_CTRUNC:
                # The kernel dropped descriptors meant for us: we are most
                # likely out of file descriptors (EMFILE), not the zygote's fault.
                # A fork reply still goes through, short of descriptors: its
                # child exists and must be dealt with.
                why = "its descriptors were dropped: is the supervisor out of file descriptors?"
                forked = None
                with contextlib.suppress(ProtocolError):
                    forked = decode_control(data)
                if isinstance(forked, Forked):
                    messages += [(why, []), (forked, fds)]
                else:
                    messages.append((why, fds))
            elif flags & socket.MSG_TRUNC:
                messages.append((f"sent a message over {_CONTROL_MAX} bytes", fds))
            else:
                try:
                    messages.append((decode_control(data), fds))
                except ProtocolError as exc:
                    messages.append((f"sent garbage: {exc}", fds))


@dataclass(eq=False)
class Worker:
    pid: int
    pidfd: int
    channel: socket.socket
    #: its task's job; for a pool child, its PoolFork until it is handed a job
    job: Job | PoolFork
    zygote: ZygoteProc
    requested: float  # when the fork was requested: the start of the ready deadline
    #: frames bigger than the largest result allowed are refused (set by the spawner)
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    outbox: bytearray = field(default_factory=bytearray)
    ready_at: float | None = None
    alive: bool = True
    channel_open: bool = True
    status: int | None = None
    status_lost: bool = False
    rusage: tuple[float, float, int] = (0.0, 0.0, 0)
    result_seen: bool = False
    phase: str | None = None
    #: why the supervisor gave up on it (deadline, validator, garbage)
    failure: str | None = None
    #: the start-up step (validator, hook) it failed in, for the stats
    failed_step: str | None = None
    timed_out: bool = False
    warnings: list[str] = field(default_factory=list)  # the zygote's, at its fork
    timers: list[Timer] = field(default_factory=list)  # its task's time limit
    pooled: bool = False  # validated and waiting in the ready pool
    retired: bool = False  # a pool child let go (old generation, stopping)

    @property
    def generation(self) -> int:
        return self.zygote.generation

    def running(self) -> bool:
        """Still running right now? `alive` turns False only once the loop
        has handled the exit; the pidfd knows at once (one poll, no wait)."""
        if not self.alive:
            return False
        poller = select.poll()  # not select(): descriptors past 1023 are common here
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def signal(self, sig: int) -> bool:
        """Signal it if it still runs (through its pidfd: never a recycled pid)."""
        return self.alive and send_signal(self.pidfd, sig)

    def reap_orphan(self) -> None:
        """Its zygote is gone: it became our child (we are the subreaper) and
        is ours to reap — unless the zygote reaped it and died before saying."""
        try:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.status_lost = True
            return
        if pid:
            self.status = status
            self.rusage = (usage.ru_utime, usage.ru_stime, usage.ru_maxrss)

    def exit_status(self) -> tuple[int | None, int | None, str]:
        """(exit code, signal, in words) once it has ended."""
        if self.status is None:
            return None, None, "ended (exit status lost with its zygote)"
        code, sig, _ = wait_status_parts(self.status)
        return code, sig, describe_wait_status(self.status)

    @property
    def ended(self) -> bool:
        return not self.alive and (self.status is not None or self.status_lost)

    def read(self) -> tuple[list[bytes], bool]:
        """Every complete frame waiting on the channel, and whether it closed."""
        chunks = []
        closed = False
        while True:
            try:
                data = self.channel.recv(_RECV_CHUNK)
            except BlockingIOError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            chunks.append(data)
        frames = self.decoder.feed(b"".join(chunks)) if chunks else []
        return frames, closed

    def write(self, data: bytes) -> bool:
        """Queue `data` and send what the socket takes; True when all is sent."""
        self.outbox += data
        return self.flush()

    def flush(self) -> bool:
        try:
            while self.outbox:
                sent = self.channel.send(self.outbox)
                del self.outbox[:sent]
        except BlockingIOError:
            return False
        except OSError:  # the worker is gone; its exit will be reported
            self.outbox.clear()
        return True
