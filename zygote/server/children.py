"""The supervisor's view of its children: zygote processes, the children
they fork (workers and ready-pool children), and the jobs those serve.
State, checked moves (lifecycle.py) and non-blocking socket plumbing only;
decisions live in the fleet (zygotes), the tracker (worker processes) and
the spawner (jobs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..cgroups import Cgroup
from ..codec import FrameDecoder, decode_control
from ..linux import describe_wait_status, send_signal, wait_status_parts
from ..protocol import DEFAULT_PROFILE, Control, Forked, ProtocolError, Spawn
from .lifecycle import (
    CHILD_MOVES,
    JOB_MOVES,
    SLOT_STATES,
    ChildState,
    JobState,
    Slots,
    StateError,
    check,
    is_live,
)
from .output import Capture
from .timers import Timer

#: The directory our `zygote` package is in.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RECV_CHUNK = 1 << 18
#: Control messages are small (a fork request carries at most CARRY_LIMIT);
#: anything longer is a protocol error, not a reason to allocate more.
_CONTROL_MAX = 1 << 17


class ZygoteState(enum.Enum):
    BOOTING = "booting"
    READY = "ready"
    RETIRING = "retiring"  # control closed by us; it exits when it notices
    DEAD = "dead"


@dataclass(eq=False)
class Job:
    """One accepted spawn request, from the queue to its outcome."""

    handle: str
    spawn: Spawn
    state: JobState = JobState.QUEUED
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)
    #: the child forked for it (or taken from the pool), while it has one
    child: Child | None = None
    #: the signal a client killed it with before it ran: not retried
    killed: int | None = None
    #: its resource limits: the server's, lowered by the spawn's own
    limits: dict[str, float] = field(default_factory=dict)
    #: "raised KeyError" once its worker reported that (for the log)
    raised: str | None = None

    @property
    def profile(self) -> str:
        return self.spawn.profile or DEFAULT_PROFILE

    def move(self, state: JobState) -> None:
        """The one place a job changes state (checked against JOB_MOVES)."""
        check(JOB_MOVES, f"job {self.handle}", self.state, state)
        self.state = state
        if state in (JobState.RUNNING, JobState.DONE) and self.spawn.payload:
            # Its worker has its task, or it is over: nothing that still
            # holds the job (a log line, a late event) keeps the arguments.
            self.spawn = dataclasses.replace(self.spawn, payload=b"")
        if state is JobState.DONE:
            self.child = None  # no cycle left for the collector to find


@dataclass(eq=False)
class ZygoteProc:
    generation: int
    pid: int
    pidfd: int
    control: socket.socket
    started: float
    #: kept so that subprocess never reaps it behind our back (it would, from
    #: a Popen object collected while the process runs); we reap it ourselves
    process: subprocess.Popen[bytes] | None = None
    state: ZygoteState = ZygoteState.BOOTING
    #: fork requests sent and not yet answered, by handle
    pending: dict[str, Child] = field(default_factory=dict)
    reaped: bool = False
    boot_timer: Timer | None = None
    healthy_children: int = 0
    corrupt_in_a_row: int = 0
    #: why its latest child failed to start, with the traceback if it sent one
    last_failure: str | None = None
    condemned: str | None = None  # why it is to be killed, once the current batch is done
    repeated: bool = False  # condemned for a reason already reported (a refork refusal)
    #: its latest thread report (one dict per kind of thread)
    threads: list[dict[str, Any]] = field(default_factory=list)
    #: its helper process (background functions), while it runs
    helper_pid: int | None = None
    helper_restarts: int = 0
    #: an eventfd counting background messages dropped (workers, helper)
    drops_fd: int | None = None
    #: jobs started on its children (the refork policy counts them)
    spawns: int = 0
    #: the generation whose worker it was, if it came from a refork
    promoted_from: int | None = None
    #: its lineage (`--profile`)
    profile: str = DEFAULT_PROFILE

    @classmethod
    def start(
        cls,
        generation: int,
        lifeline_fd: int,
        now: float,
        credentials: tuple[int, int, list[int]] | None = None,
    ) -> ZygoteProc:
        """Exec a fresh interpreter as the zygote (as the user and groups of
        `credentials`, if given). Never fork the supervisor itself: it has
        ZeroMQ's threads, and it must not carry their state."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The same zygote package as ours (a source checkout is found through
        # the working directory, which -P leaves out), and then out of the way.
        code = (
            f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
            "from zygote.child.forkserver import main; sys.path.pop(0); "
            "main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))"
        )
        # -P: no "" (the working directory, whatever it is now) on sys.path. A
        # job's _cwd is only where it runs, never an import root (preload()
        # puts the server's own directory there, as an absolute path).
        argv = [sys.executable, "-P", "-c", code, str(theirs.fileno()), str(lifeline_fd)]
        argv.append(str(os.getpid()))
        switch: dict[str, Any] = {}
        if credentials is not None:
            uid, gid, groups = credentials
            switch = {"user": uid, "group": gid, "extra_groups": groups, "env": _user_env(uid)}
        try:
            # Its own process group: a terminal's ^C reaches the supervisor
            # only, which then decides how workers stop.
            process = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(), lifeline_fd), process_group=0, **switch
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(generation, process.pid, os.pidfd_open(process.pid), ours, now, process)

    def kill(self) -> None:
        if not self.reaped:  # a reaped one's pidfd is closed, or about to be
            send_signal(self.pidfd, signal.SIGKILL)

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


def _user_env(uid: int) -> dict[str, str]:
    """Our environment, with the user's own HOME, USER and LOGNAME."""
    entry = pwd.getpwuid(uid)
    names = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}
    return {**os.environ, **names}


@dataclass(eq=False)
class Child:
    """One fork request and, once forked, the process it made: a worker for
    `job`, or a ready-pool child (no job until it takes one)."""

    name: str  # its fork request's handle: its job's, or "pool:N"
    zygote: ZygoteProc
    slots: Slots
    job: Job | None = None
    state: ChildState = ChildState.FORKING
    requested: float = 0.0  # when the fork was requested: the start of the ready deadline
    carried: bool = False  # its task travelled with the fork request
    candidate: bool = False  # told to wait, after its task, for a refork's Promote
    probe: bool = False  # forked to check a new generation before it serves
    #: its deadlines (fork, ready, time limit, exit): cancelled when it exits
    timers: list[Timer] = field(default_factory=list)
    # What it said, and what was decided about it, before it was ready.
    warnings: list[str] = field(default_factory=list)  # the zygote's, at its fork
    phase: str | None = None  # the start-up step it reported last
    failure: str | None = None  # why the supervisor condemned it
    failed_step: str | None = None  # the step (validator, hook) it failed in
    ready_at: float | None = None
    timed_out: bool = False  # killed for running past its time limit
    # The process, once forked.
    pid: int = 0
    pidfd: int = -1
    channel: socket.socket | None = None  # None again once closed
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    outbox: bytearray = field(default_factory=bytearray)
    output: Capture | None = None  # its stdout and stderr (output.py)
    # How it ended: the state it exited from, its wait status and usage.
    exited_from: ChildState | None = None
    status: int | None = None
    status_lost: bool = False
    rusage: tuple[float, float, int] = (0.0, 0.0, 0)
    # Cleanup and limits (cleanup.py).
    cgroup: Cgroup | None = None  # its own, while it has one
    #: while it is being moved into it: what waits for the move (cleanup.py)
    placing: list[Callable[[], object]] | None = None
    limits: dict[str, float] = field(default_factory=dict)  # its job's
    limit_hit: str | None = None  # the limit that the kernel ended it for

    def __post_init__(self) -> None:
        self.slots.moved(False, self.holds_slot)  # a fork for a job takes a slot

    def move(self, state: ChildState) -> None:
        """The one place a child changes state (checked against CHILD_MOVES);
        the slot it holds for its job follows."""
        check(CHILD_MOVES, f"child {self.name}", self.state, state)
        held = self.holds_slot
        if state is ChildState.EXITED:
            self.exited_from = self.state
        self.state = state
        self.slots.moved(held, self.holds_slot)

    def take(self, job: Job) -> None:
        """A ready pool child takes a job: it runs the moment it reads the task."""
        if self.job is not None:
            raise StateError(f"child {self.name} already has job {self.job.handle}")
        self.job, job.child = job, self
        self.move(ChildState.RUNNING)

    @property
    def holds_slot(self) -> bool:
        return self.job is not None and self.state in SLOT_STATES

    @property
    def alive(self) -> bool:
        """Forked, and not yet seen to exit."""
        return is_live(self.state)

    @property
    def generation(self) -> int:
        return self.zygote.generation

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()

    def forked(
        self,
        pid: int,
        pidfd: int,
        channel: socket.socket,
        max_frame: int,
        stdio: Sequence[int] = (),
    ) -> None:
        """The zygote forked it: from now on it is a process. `stdio`: the
        read ends of its stdout and stderr (none from a test's fake zygote)."""
        self.pid, self.pidfd, self.channel = pid, pidfd, channel
        self.output = Capture.of(*stdio) if stdio else None
        self.decoder = FrameDecoder(max_frame)
        self.move(ChildState.STARTING)

    def running(self) -> bool:
        """Still running right now? `alive` turns False only once the loop
        has handled the exit; the pidfd knows at once (one poll, no wait)."""
        if not self.alive or self.pidfd < 0:
            return False
        poller = select.poll()  # not select(): descriptors past 1023 are common here
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def signal(self, sig: int) -> bool:
        """Signal it if it still runs (through its pidfd: never a recycled pid)."""
        return self.alive and self.pidfd >= 0 and send_signal(self.pidfd, sig)

    def exit_status(self) -> tuple[int | None, int | None, str]:
        """(exit code, signal, in words) once it has ended."""
        if self.status is None:
            return None, None, "ended (exit status lost with its zygote)"
        code, sig, _ = wait_status_parts(self.status)
        return code, sig, describe_wait_status(self.status)

    def read(self) -> tuple[list[bytes], bool]:
        """Every complete frame waiting on the channel, and whether it closed."""
        assert self.channel is not None
        frames: list[bytes] = []
        while True:
            try:
                data = self.channel.recv(_RECV_CHUNK)
            except BlockingIOError:
                return frames, False
            except ConnectionResetError:
                return frames, True
            if not data:
                return frames, True
            # Fed chunk by chunk: a big result is not joined into one more copy.
            frames += self.decoder.feed(data)

    def write(self, data: bytes) -> bool:
        """Queue `data` and send what the socket takes; True when all is sent."""
        self.outbox += data
        return self.flush()

    def flush(self) -> bool:
        assert self.channel is not None
        try:
            while self.outbox:
                sent = self.channel.send(self.outbox)
                del self.outbox[:sent]
        except BlockingIOError:
            return False
        except OSError:  # the worker is gone; its exit will be reported
            self.outbox.clear()
        return True
