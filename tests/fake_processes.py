"""The supervisor's logic without processes: the real fleet, spawner, pool and
tracker on an event loop with a hand-driven clock, talking to fake zygotes and
workers over real sockets. Only the kernel's side is faked: a "process" is an
eventfd standing in for its pidfd (readable once it has exited), and signals
sent through pidfds are recorded (a SIGKILL, SIGTERM or SIGABRT makes the fake
process exit). Pids are above any pid_max, so nothing real is ever signalled
or reaped by mistake.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from zygote.codec import FrameDecoder, decode_channel, decode_control, encode, frame
from zygote.config import ServerConfig
from zygote.protocol import (
    Boot,
    Booted,
    ChannelMessage,
    Control,
    ErrorCode,
    Fork,
    Forked,
    Message,
    Promote,
    Reaped,
    Spawn,
)
from zygote.server import children, spawner
from zygote.server.children import Job, ZygoteProc
from zygote.server.fleet import Fleet
from zygote.server.loop import EventLoop
from zygote.server.spawner import Spawner
from zygote.server.tracker import Tracker

_FAKE_PIDS = itertools.count(5_000_000)  # beyond pid_max (4,194,304 at most)
_DEADLY = {signal.SIGKILL, signal.SIGTERM, signal.SIGABRT}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Kernel:
    """Signals sent through pidfds, by pidfd; a deadly one ends the process."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def send_signal(self, pidfd: int, sig: int) -> bool:
        self.sent.append((pidfd, sig))
        if sig in _DEADLY:
            os.eventfd_write(pidfd, 1)
        return True

    def signals(self, pidfd: int) -> list[int]:
        return [sig for fd, sig in self.sent if fd == pidfd]


@dataclass
class FakeWorker:
    """The child's side of a fork: its channel and its "process"."""

    pid: int
    request: Fork
    channel: socket.socket
    pidfd: int  # ours; the supervisor has its own copy
    decoder: FrameDecoder = field(default_factory=FrameDecoder)

    def send(self, msg: ChannelMessage) -> None:
        self.channel.sendall(frame(encode(msg)))

    def received(self) -> tuple[list[Message], bool]:
        """What the supervisor sent it so far, and whether it closed its end."""
        messages: list[Message] = []
        while True:
            try:
                data = self.channel.recv(1 << 16)
            except BlockingIOError:
                return messages, False
            if not data:
                return messages, True
            messages += [decode_channel(f) for f in self.decoder.feed(data)]

    def exit(self) -> None:
        os.eventfd_write(self.pidfd, 1)

    def promotion(self, fleet: Fleet) -> FakeZygote:
        """The Promote this worker was sent, and the zygote it becomes."""
        data, fds, _, _ = socket.recv_fds(self.channel, 4096, 1)
        messages = [decode_channel(f) for f in self.decoder.feed(data)]
        assert [type(m) for m in messages] == [Promote] and len(fds) == 1, messages
        control = socket.socket(fileno=fds[0])
        return FakeZygote(control, fleet.zygotes[self.pid], self.pidfd)


class FakeZygote:
    """The zygote's side of its control socket."""

    def __init__(self, sock: socket.socket, proc: ZygoteProc, pidfd: int) -> None:
        self.sock, self.proc, self.pidfd = sock, proc, pidfd
        self.sock.setblocking(False)
        self.workers: list[FakeWorker] = []

    @classmethod
    def launched(cls, generation: int, now: float) -> FakeZygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        pidfd = os.eventfd(0, os.EFD_NONBLOCK)
        proc = ZygoteProc(generation, next(_FAKE_PIDS), os.dup(pidfd), ours, now)
        return cls(theirs, proc, pidfd)

    def recv(self) -> Control | None:
        """The next message from the supervisor; None if none is waiting, or
        at end-of-file (see `closed`)."""
        try:
            data = self.sock.recv(1 << 17)
        except BlockingIOError:
            return None
        return decode_control(data) if data else None

    def closed(self) -> bool:
        try:
            return self.sock.recv(1 << 17, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False

    def send(self, msg: Control, fds: list[int] | None = None) -> None:
        socket.send_fds(self.sock, [encode(msg)], fds or [])

    def boot(self) -> Boot:
        boot = self.recv()
        assert isinstance(boot, Boot), boot
        self.send(Booted(self.proc.pid, self.proc.generation))
        return boot

    def fork(self) -> FakeWorker:
        """Answer the next fork request with a new (fake) child."""
        request = self.recv()
        assert isinstance(request, Fork), request
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        worker = FakeWorker(next(_FAKE_PIDS), request, ours, os.eventfd(0, os.EFD_NONBLOCK))
        self.send(Forked(request.handle, worker.pid), [theirs.fileno(), worker.pidfd])
        theirs.close()
        self.workers.append(worker)
        return worker

    def reap(self, worker: FakeWorker, status: int = 0) -> None:
        """Tell the supervisor how a child ended (a wait status)."""
        self.send(Reaped(worker.pid, status, 0.01, 0.0, 1024))


class Clients:
    """What the spawner tells the clients' side, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def job_started(self, handle: str, pid: int, generation: int, warnings: list[str]) -> None:
        self.events.append(("started", handle, pid, generation))

    def job_result(self, handle: str, data: bytes) -> None:
        self.events.append(("result", handle, data))

    def job_ended(self, handle: str, result: bytes | None, exited: bytes) -> None:
        self.events.append(("ended", handle, result, exited))

    def job_failed(self, handle: str, code: ErrorCode, text: str, reasons: list[str]) -> None:
        self.events.append(("failed", handle, code, text, list(reasons)))

    def kinds(self, handle: str) -> list[str]:
        return [event[0] for event in self.events if event[1] == handle]


class Harness:
    """A supervisor's fleet, spawner and tracker, with fake processes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
        self.kernel = Kernel()
        for module in (children, spawner):
            monkeypatch.setattr(module, "send_signal", self.kernel.send_signal)
        settings = {"prefork": 0, "max_workers": 2, **settings}
        self.config = ServerConfig(**settings)
        self.clock = Clock()
        self.loop = EventLoop(self.clock)
        self.clients = Clients()
        self.zygotes: list[FakeZygote] = []
        self.gave_up: list[tuple[str, int]] = []
        self.tracker = Tracker(self.config, self.loop, find_children=set)
        self.fleet = Fleet(
            self.config,
            self.loop,
            -1,
            self.tracker,
            lambda why, code: self.gave_up.append((why, code)),
            launch=self._launch,
        )
        self.spawner = Spawner(
            self.config, self.loop, {"default": self.fleet}, self.tracker, self.clients
        )
        self.fleet.start()

    def _launch(self, generation: int, lifeline_fd: int, now: float) -> ZygoteProc:
        zygote = FakeZygote.launched(generation, now)
        self.zygotes.append(zygote)
        return zygote.proc

    @property
    def zygote(self) -> FakeZygote:
        """The newest zygote."""
        return self.zygotes[-1]

    def run(self, advance: float = 0.0) -> None:
        """Move the clock on, then handle everything that is ready."""
        self.clock.now += advance
        for _ in range(5):
            self.loop.run_once(0)

    def submit(self, handle: str, *args: Any, timeout: float | None = None) -> Job:
        payload = msgpack.packb([list(args), {}])
        job = Job(handle, Spawn(1, "tests.tasks:add", payload, timeout=timeout, handle=handle))
        self.spawner.submit(job)
        self.run()
        return job

    def promoted(self, worker: FakeWorker) -> FakeZygote:
        zygote = worker.promotion(self.fleet)
        self.zygotes.append(zygote)
        return zygote

    def close(self) -> None:
        pidfds = {z.pidfd for z in self.zygotes}
        pidfds |= {w.pidfd for z in self.zygotes for w in z.workers}
        for zygote in self.zygotes:
            zygote.sock.close()
            for worker in zygote.workers:
                worker.channel.close()
        for pidfd in pidfds:  # a promoted worker's is its zygote's
            os.close(pidfd)
