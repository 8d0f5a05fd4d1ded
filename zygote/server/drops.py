"""Background messages dropped (`@zygote.background`'s `send()`: a worker's
buffer or a helper's inbox was full, or the helper was gone): each zygote
hands over an eventfd its workers and helper count drops on; the supervisor
adds them up and logs them at most once per interval. Part of the
supervisor process."""

from __future__ import annotations

import contextlib
import logging
import os

from .children import ZygoteProc
from .loop import EventLoop
from .timers import Timer

log = logging.getLogger("zygote.supervisor")

#: Dropped background messages are logged at most once per this many seconds.
DROPS_LOG_INTERVAL = 10.0


class Drops:
    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.total = 0
        self._logged = 0
        self._timer: Timer | None = None
        # Zygotes gone whose counter stays open while their workers run.
        self._retired: list[ZygoteProc] = []

    def watch(self, zygote: ZygoteProc, fd: int) -> None:
        """Count what `zygote`'s workers and helper drop, on `fd` (an eventfd)."""
        zygote.drops_fd = fd
        self.loop.watch(fd, lambda: self._count(zygote))

    def _count(self, zygote: ZygoteProc) -> None:
        """Drops were counted: add them, and say so at once if nothing was
        said for DROPS_LOG_INTERVAL, else when it is up."""
        assert zygote.drops_fd is not None
        with contextlib.suppress(BlockingIOError):
            self.total += os.eventfd_read(zygote.drops_fd)
        if self._timer is None:
            self._log()

    def _log(self) -> None:
        self._timer = None
        new = self.total - self._logged
        if not new:
            return
        log.warning(
            "%d background messages dropped (a worker's buffer or a helper's inbox was "
            "full, or the helper gone); %d in all",
            new,
            self.total,
        )
        self._logged = self.total
        self._timer = self.loop.later(DROPS_LOG_INTERVAL, self._log)

    def zygote_gone(self, zygote: ZygoteProc) -> None:
        """Its workers may still count drops: keep its counter until they end."""
        if zygote.drops_fd is not None:
            self._retired.append(zygote)

    def forget(self, working: set[int]) -> None:
        """Close the counters of gone zygotes none of whose workers runs any
        more (`working`: the pids of zygotes with live workers)."""
        for zygote in [z for z in self._retired if z.pid not in working]:
            self._retired.remove(zygote)
            self._close(zygote)

    def close(self, zygotes: list[ZygoteProc]) -> None:
        """At the end: close every counter."""
        for zygote in [*zygotes, *self._retired]:
            self._close(zygote)
        self._retired.clear()

    def _close(self, zygote: ZygoteProc) -> None:
        if zygote.drops_fd is not None:
            self.loop.unwatch(zygote.drops_fd)
            os.close(zygote.drops_fd)
            zygote.drops_fd = None
