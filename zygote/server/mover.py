"""Moving workers into their cgroups off the supervisor's loop. Part of the
supervisor process.

Without `favordynmods` on the cgroup2 mount, the kernel makes a move into
a cgroup wait for an RCU grace period first: most moves take 0.1 ms, one
in ten or so 5-16 ms here. Done on the loop, that wait held up everything
else the supervisor had to do, another job's result included (traced: a
ready-pool refill's move kept a finished job's result back 5.7 ms). So a
thread of its own does the writes, and the loop hears of each one through
a pipe; nothing the moved worker may do waits for less (cleanup.py).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
from typing import TYPE_CHECKING

from ..cgroups import Cgroup

if TYPE_CHECKING:
    from .children import Child

__all__ = ["Mover"]

#: A finished move: the child (its pid as it was when asked), its cgroup,
#: and the error, if the move failed.
Moved = tuple["Child", int, Cgroup, OSError | None]


class Mover:
    """One thread that writes pids into cgroups, in the order asked."""

    def __init__(self) -> None:
        self._todo: queue.SimpleQueue[tuple[Child, int, Cgroup] | None] = queue.SimpleQueue()
        self._done: collections.deque[Moved] = collections.deque()
        #: readable when moves have finished: then call `finished()`
        self.wake, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="zygote-cgroup-mover", daemon=True)
        self._thread.start()

    def move(self, child: Child, cgroup: Cgroup) -> None:
        """Move `child` into `cgroup`, soon; `finished()` tells. The thread
        reads nothing of the child but the pid taken here."""
        self._todo.put((child, child.pid, cgroup))

    def finished(self) -> list[Moved]:
        """The moves done since the last call."""
        # Read the wake-ups first: one written after this read is for a
        # move taken below or later, never lost (at worst a wake-up for nothing).
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake, 4096)
        done: list[Moved] = []
        while self._done:
            done.append(self._done.popleft())
        return done

    def close(self) -> None:
        """Stop the thread, after the moves already asked for."""
        self._todo.put(None)
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            return  # stuck in the kernel: its pipe stays, or it could write to a reused fd
        for fd in (self.wake, self._wake_w):
            os.close(fd)

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            child, pid, cgroup = item
            error: OSError | None = None
            try:
                cgroup.add(pid)
            except OSError as exc:
                error = exc
            except Exception as exc:  # the thread must live on, or no child ever runs
                error = OSError(f"{type(exc).__name__}: {exc}")
            self._done.append((child, pid, cgroup, error))
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                os.write(self._wake_w, b"\0")
