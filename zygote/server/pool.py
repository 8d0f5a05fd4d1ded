"""The ready pool: children forked and validated ahead of need, waiting for a
task, like Android's pool of unspecialized app processes. A spawn takes one
and sends it its task — no fork on the request's path — and the pool is
refilled in the background. Part of the supervisor process.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable

from .children import Child, ZygoteProc
from .lifecycle import ChildState
from .loop import EventLoop
from .timers import Timer

log = logging.getLogger("zygote.supervisor")

#: Refilling right after a take forks while the taken child runs its task;
#: on a small machine the two compete for the same cores. Waiting a little
#: first measured faster (docs/benchmarks.md).
REFILL_DELAY = 0.005
#: A fork refused by the thread policy is tried again after this, doubling
#: up to the cap: the threads may go, but asking 200 times a second is noise.
REFUSED_DELAY, REFUSED_DELAY_CAP = 0.1, 5.0


class ReadyPool:
    def __init__(
        self,
        size: int,
        loop: EventLoop,
        request_fork: Callable[[str], Child | None],
        retire: Callable[[Child], None],
    ) -> None:
        self.size = size
        self.loop = loop
        self.request_fork = request_fork
        self._retire = retire
        self.ready: collections.deque[Child] = collections.deque()  # IDLE, oldest first
        self.starting: set[Child] = set()  # forks requested for the pool, not ready yet
        self.taken = 0
        self._numbers = itertools.count(1)
        self._timer: Timer | None = None
        self._refused_delay = 0.0
        self._error = ""  # the last fork error, logged once

    def take(self, current: ZygoteProc | None) -> Child | None:
        """A validated child of the current zygote, or None. Children of an
        older generation are let go on the way: they have the old code."""
        while self.ready:
            child = self.ready.popleft()
            # Its death may sit unhandled in the same batch of events as this
            # request: a child that died is not given a task it cannot run.
            if child.zygote is current and child.running():
                self.taken += 1
                self.refill_soon()
                return child
            self._retire(child)
            self.refill_soon()  # a child of the current zygote that died: replace it
        return None

    def refill_soon(self, delay: float = REFILL_DELAY) -> None:
        if self.size and self._timer is None:
            self._timer = self.loop.later(delay, self.refill)

    def refill(self) -> None:
        """Request forks until the pool (ready and starting) is full."""
        self._timer = None
        while len(self.ready) + len(self.starting) < self.size:
            # ":" is outside the alphabet of the handles clients pick.
            child = self.request_fork(f"pool:{next(self._numbers)}")
            if child is None:
                return
            self.starting.add(child)

    def fork_failed(self, child: Child, error: str, refused: bool) -> None:
        """A pool fork failed (or was refused by the thread policy: back off)."""
        if error != self._error:  # once per change, not per retry
            log.warning("ready pool: %s", error)
            self._error = error
        if refused:
            self.back_off(child)
        else:
            self.replace(child)

    def back_off(self, child: Child) -> None:
        """The zygote refused a pool fork (thread policy): back off."""
        self.starting.discard(child)
        self._refused_delay = min(max(REFUSED_DELAY, self._refused_delay * 2), REFUSED_DELAY_CAP)
        self.refill_soon(self._refused_delay)

    def add(self, child: Child) -> None:
        """A pool child reported ready: it waits, idle, for a task."""
        self._refused_delay = 0.0
        self._error = ""
        self.starting.discard(child)
        child.move(ChildState.IDLE)
        self.ready.append(child)

    def trim(self, current: ZygoteProc | None) -> None:
        """Let go of ready children of other generations and of any beyond
        the pool's size (a new generation's probe child, when it has none)."""
        self.retire_stale(current)
        while self.ready and len(self.ready) + len(self.starting) > self.size:
            self.retire(self.ready[-1])

    def replace(self, child: Child) -> None:
        """A pool child (or its fork) failed before ready, or died idle: fork another."""
        self.starting.discard(child)
        if child in self.ready:
            self.ready.remove(child)
        self.refill_soon()

    def retire(self, child: Child) -> None:
        """Let an idle pool child go: closing its channel tells it to exit."""
        if child in self.ready:
            self.ready.remove(child)
        if child.state is ChildState.IDLE:
            self._retire(child)

    def retire_stale(self, current: ZygoteProc | None) -> None:
        """Let go of ready children of a zygote that is no longer current."""
        stale = [child for child in self.ready if child.zygote is not current]
        for child in stale:
            self.retire(child)
        if stale:
            self.refill_soon()

    def retire_all(self) -> None:
        self.size = 0
        for child in list(self.ready):
            self.retire(child)
