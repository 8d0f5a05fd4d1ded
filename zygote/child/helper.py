"""The helper: the process that runs the background functions
(`@zygote.background`), each in a thread of its own, so that the zygote
itself keeps none.

The zygote forks it right after its preload, and again whenever it dies
(with back-off); each zygote generation has its own, which ends with it. It
is forked rather than exec'd: it boots in a millisecond, shares the zygote's
memory and costs no second preload — at the price of starting from the
zygote's state, so a preload that started threads in the zygote anyway
(native ones, say) leaves this process what it leaves the workers: a fork
taken under the same guards. Like a worker, it cannot outlive the
supervisor (its own lifeline).

Its main thread receives what workers `.send()` and puts each message in
its function's inbox; a message it cannot place (inbox full, no such
function, garbage) is dropped and counted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from ..linux import (
    arm_lifeline,
    describe_wait_status,
    lifeline_cut,
    open_lifeline,
    send_signal,
    set_thread_name,
)
from ..protocol import Control, HelperExited, HelperStarted
from .outbox import MAX_MESSAGE, OUTBOX, REGISTRY, SEND_BUFFER, Background

log = logging.getLogger("zygote.helper")

#: Messages an inbox holds before the helper drops (and counts) new ones.
INBOX_SIZE = 10_000
#: A background function that fails is started again after this, doubling
#: up to the cap while it keeps failing within a minute.
RESTART_DELAY, RESTART_DELAY_CAP = 1.0, 60.0


class Inbox:
    """What workers sent to one background function, each sender's messages
    in the order it sent them. Iterate it (``for item in inbox: ...``), or
    take one item with `get()`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.Queue[Any] = queue.Queue(INBOX_SIZE)

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self._queue.get()

    def get(self, timeout: float | None = None) -> Any:
        """The next item; raises `queue.Empty` after `timeout` seconds."""
        return self._queue.get(timeout=timeout)

    def put(self, item: Any) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def pending(self) -> int:
        """Items waiting to be taken."""
        return self._queue.qsize()


def run(channel: int, lifeline: int) -> int:
    """The helper's whole life (call in the helper only): start every
    background function, then deliver messages until killed, or until the
    supervisor is gone."""
    inboxes: dict[str, Inbox] = {}
    for bg in REGISTRY.values():
        inbox = Inbox(bg.name) if bg.takes_inbox else None
        if inbox is not None:
            inboxes[bg.name] = inbox
        thread = threading.Thread(target=_keep_running, args=(bg, inbox), name=bg.name)
        thread.daemon = True
        thread.start()
    log.info("helper running %d background functions", len(REGISTRY))

    def stopping(signum: int, frame: object) -> None:
        # What is already in the inboxes dies with this process: say how much.
        OUTBOX.count_dropped(sum(inbox.pending() for inbox in inboxes.values()))
        os._exit(0)

    signal.signal(signal.SIGTERM, stopping)
    receiver = socket.socket(fileno=channel)
    buffer = bytearray(MAX_MESSAGE)
    unknown: set[str] = set()
    # The zygote arms the lifeline (SIGIO) right after the fork; a hang-up
    # before that raised nothing, so the lifeline is watched here as well.
    watch = select.poll()
    watch.register(channel, select.POLLIN)
    watch.register(lifeline, select.POLLIN)
    while True:
        ready = {fd for fd, _ in watch.poll()}
        if lifeline in ready and lifeline_cut(lifeline):
            return 0
        if channel not in ready:
            continue
        try:
            size = receiver.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        # Whatever a worker wrote, the helper carries on: a message that is
        # not [name, item] with a name of ours is dropped and counted.
        try:
            name, item = msgpack.unpackb(memoryview(buffer)[:size], raw=False, strict_map_key=False)
            target = inboxes.get(name) if isinstance(name, str) else None
        except Exception:
            log.warning("dropped a malformed background message (%d bytes)", size)
            OUTBOX.count_dropped(1)
            continue
        if target is None:
            if len(unknown) < 100 and repr(name) not in unknown:  # once per name
                unknown.add(repr(name))
                log.warning("dropped messages for %r: no background function takes them", name)
            OUTBOX.count_dropped(1)
        elif not target.put(item):
            OUTBOX.count_dropped(1)


def _keep_running(bg: Background[Any], inbox: Inbox | None) -> None:
    """Run a background function; start it again (with back-off) if it raises."""
    set_thread_name(bg.name.rpartition(":")[2])
    delay = RESTART_DELAY
    while True:
        started = time.monotonic()
        try:
            if inbox is not None:
                bg.func(inbox)
            else:
                bg.func()
        except Exception:
            if time.monotonic() - started > RESTART_DELAY_CAP:
                delay = RESTART_DELAY
            log.exception("background function %s failed; starting it again in %gs", bg.name, delay)
            time.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_CAP)
            continue
        log.info("background function %s returned", bg.name)
        return


class Keeper:
    """The zygote's side of its helper process: the background channel,
    forking the helper, restarting it with back-off, stopping it when the
    zygote retires. Runs in the zygote."""

    #: A helper that dies within STABLE seconds of its start is started again
    #: after a delay doubling from FIRST to CAP; one that lived longer, at once.
    FIRST, CAP, STABLE = 0.1, 10.0, 10.0

    def __init__(
        self,
        lifeline_fd: int,
        poller: select.poll,
        fork: Callable[[Callable[[], int]], int],
        send: Callable[[Control, tuple[int, ...]], None],
    ) -> None:
        self.lifeline_fd = lifeline_fd
        self.poller = poller
        self.fork = fork
        self.send = send
        receiving, sending = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sending.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        # What the kernel granted (it doubles the request, capped by
        # net.core.wmem_max); a datagram must fit in it with room to spare.
        granted = sending.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        max_message = min(MAX_MESSAGE, granted // 2 - 4096)
        self.drops = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Workers inherit the sending end; the receiving end stays open here
        # too, so what they send while the helper restarts waits for it.
        OUTBOX.attach(sending.detach(), self.drops, max_message)
        self.channel = receiving.detach()
        self.pid = 0
        self.pidfd = -1
        self.restarts = -1
        self.started = 0.0
        self.delay = 0.0
        self.due: float | None = None

    def fds(self) -> tuple[int, ...]:
        """What a worker must not inherit."""
        return (self.channel, self.pidfd) if self.pidfd >= 0 else (self.channel,)

    def due_in(self) -> int | None:
        """Milliseconds until a restart is due (for poll), or None."""
        if self.due is None:
            return None
        return max(0, int((self.due - time.monotonic()) * 1000))

    def start(self) -> None:
        self.due = None
        try:
            lifeline = open_lifeline(self.lifeline_fd)
        except OSError as exc:  # out of descriptors, say
            self._failed(exc)
            return
        try:
            pid = self.fork(lambda: run(self.channel, lifeline))
        except OSError as exc:
            os.close(lifeline)
            self._failed(exc)
            return
        arm_lifeline(lifeline, pid)  # before anything else: it must not outlive the supervisor
        os.close(lifeline)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # it died already (lifeline cut?): kill and reap it
            os.kill(pid, signal.SIGKILL)  # our unreaped child: its pid is its own
            os.waitpid(pid, 0)
            self._failed(OSError("the helper was gone before it could be watched"))
            return
        self.pid, self.pidfd, self.started = pid, pidfd, time.monotonic()
        self.restarts += 1
        self.poller.register(self.pidfd, select.POLLIN)
        self.send(HelperStarted(pid, self.restarts), (self.drops,))

    def exited(self) -> None:
        """The helper died: reap it, say so, and start another (later)."""
        self.poller.unregister(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        _, status, _ = os.wait4(self.pid, 0)
        self._later()
        log.warning(
            "helper (pid %d) %s; starting another in %gs",
            self.pid,
            describe_wait_status(status),
            self.delay,
        )
        self.send(HelperExited(self.pid, status), ())

    def _failed(self, exc: OSError) -> None:
        """No helper this time: try again later, less and less often."""
        self.delay = min(max(self.delay * 2, self.FIRST), self.CAP)
        self.due = time.monotonic() + self.delay
        log.error("cannot fork the helper (%s); trying again in %gs", exc, self.delay)

    def _later(self) -> None:
        """After a helper died: at once if it had lived a while, else later
        and later."""
        lived = time.monotonic() - self.started
        self.delay = 0.0 if lived > self.STABLE else min(max(self.delay * 2, self.FIRST), self.CAP)
        self.due = time.monotonic() + self.delay

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM the helper, SIGKILL it after `grace` seconds; reap it."""
        if self.pidfd < 0:
            return
        send_signal(self.pidfd, signal.SIGTERM)
        ended = select.poll()
        ended.register(self.pidfd, select.POLLIN)
        if not ended.poll(int(grace * 1000)):
            send_signal(self.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
