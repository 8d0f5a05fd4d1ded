"""Following a horse that is not our child: a pidfd to wait on and signal
it, its exit status as os.wait4() would give it, and the signal handlers
held back while the zygote client works.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from zygote.errors import TaskError, ZygoteError

if TYPE_CHECKING:
    from zygote.handle import ExitInfo, Handle

__all__ = ["Horse", "WaitResult", "held_signals", "outcome", "returned", "wait_result"]

#: (pid, wait status, usage), as os.wait4() gives them and RQ expects.
WaitResult = tuple[int | None, int | None, resource.struct_rusage | None]

# RQ's handlers for these may reenter the zygote client (a cold shutdown
# waits for the horse) or raise out of it (the monitoring alarm). In this
# order: see held_signals.
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


class Horse:
    """A running horse: its zygote handle and a pidfd on its process."""

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.pid = handle.pid
        self.exit: WaitResult | None = None
        self._lock = threading.Lock()  # no kill on a closed (or reused) descriptor
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(handle.pid)
        except ProcessLookupError:  # it ended, and was reaped, already
            self._pidfd = None

    def wait_done(self, messages: int, returned: Callable[[], bool]) -> None:
        """Block until the process has ended or `returned()`, which is
        asked first and whenever `messages` (the client's edge-triggered
        descriptor, see Zygote.fileno) becomes readable."""
        if self._pidfd is None:
            return  # it ended, and was reaped, before we could follow it
        poller = select.poll()  # not select(): a descriptor may be past FD_SETSIZE
        poller.register(messages, select.POLLIN)
        poller.register(self._pidfd, select.POLLIN)
        while not returned():
            if any(fd == self._pidfd for fd, _ in poller.poll()):
                return

    def kill(self, sig: int) -> bool:
        """Send `sig`; False if the process has ended."""
        with self._lock:
            if self._pidfd is None:
                return False
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                return False
            return True

    def close(self) -> None:
        """Let go of the process: kill() does nothing from now on."""
        with self._lock:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold back the Python handlers of HELD_SIGNALS for the block, then
    run them, each once, in the order Python always runs them; one that
    raises does not keep the others from running."""
    caught: set[int] = set()
    previous: dict[int, Any] = {}
    try:
        for signum in HELD_SIGNALS:
            if signal.getsignal(signum) is not None:  # None: not ours to restore
                previous[signum] = signal.signal(signum, lambda signum, _: caught.add(signum))
        yield
    finally:
        # A handler put back may run, and raise, before the next one is put
        # back. The alarm's, the one that raises in normal operation, goes
        # last; the others raise only to leave the worker (a cold shutdown).
        for held, handler in previous.items():
            signal.signal(held, handler)
        if caught:
            _run_handlers(caught)


def _run_handlers(signums: set[int]) -> None:
    """Run the Python handlers of `signums` now, every one of them."""
    # Raised while blocked, they arrive together when unblocked. Python then
    # runs the handlers in signal order, and when one raises, leaves the rest
    # for its next check: made here, each pthread_sigmask() call makes one.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    for signum in signums:
        signal.pthread_kill(threading.get_ident(), signum)
    error: BaseException | None = None
    for _ in range(len(signums) + 1):
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            break
        except BaseException as exc:
            # The first wins, but leaving the worker outranks the alarm.
            if error is None or not isinstance(exc, Exception):
                error = exc
    if error is not None:
        raise error


def wait_result(info: ExitInfo) -> WaitResult:
    """An ExitInfo as os.wait4() would have put it."""
    if info.signal:
        status: int | None = info.signal
    elif info.exit_code is not None:
        status = (info.exit_code & 0xFF) << 8
    else:
        status = None  # the server could not tell
    usage = resource.struct_rusage((info.utime, info.stime, info.maxrss_kb, *(0,) * 13))
    return info.pid, status, usage


def returned(handle: Handle) -> bool:
    """Whether the horse's task has returned (a `Finished`, or whether RQ's
    code recorded the job), rather than raised or not ended yet. Never
    blocks; holds back the signals the client must not see."""
    with held_signals():
        # run_job never returns None: None is "no value", whatever the reason.
        return outcome(handle)[1] is not None


def outcome(handle: Handle) -> tuple[TaskError | None, object]:
    """What the horse returned (a `Finished`, or whether RQ's code recorded
    the job), or what it raised instead of running RQ's code (on a server
    that cannot import zygote_rq.horse, say: a zygote worker then exits
    with 0)."""
    if not handle.done():
        return None, None
    try:
        return None, handle.result()
    except TaskError as exc:
        return (None if exc.exc_type == "SystemExit" else exc), None
    except ZygoteError:
        return None, None  # killed, or lost: its exit status says so
