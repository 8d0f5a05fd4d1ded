"""The ready pool: children forked and validated ahead of need, waiting for a
task, like Android's pool of unspecialized app processes. A spawn takes one
and sends it its task — no fork on the request's path — and the pool is
refilled in the background. Part of the supervisor process.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable

from .children import PoolFork, Worker, ZygoteProc
from .loop import EventLoop
from .timers import Timer

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
        request_fork: Callable[[PoolFork], bool],
        close_channel: Callable[[Worker], None],
    ) -> None:
        self.size = size
        self.loop = loop
        self.request_fork = request_fork
        self.close_channel = close_channel
        self.ready: collections.deque[Worker] = collections.deque()
        self.starting = 0  # forks requested for the pool, not ready yet
        self.taken = 0
        self._numbers = itertools.count(1)
        self._timer: Timer | None = None
        self._refused_delay = 0.0

    def take(self, current: ZygoteProc | None) -> Worker | None:
        """A validated child of the current zygote, or None. Children of an
        older generation are let go on the way: they have the old code."""
        while self.ready:
            worker = self.ready.popleft()
            worker.pooled = False
            # Its death may sit unhandled in the same batch of events as this
            # request: a child that died is not given a task it cannot run.
            if worker.zygote is current and worker.running():
                self.taken += 1
                self.refill_soon()
                return worker
            self.retire(worker)
            self.refill_soon()  # a child of the current zygote that died: replace it
        return None

    def refill_soon(self, delay: float = REFILL_DELAY) -> None:
        if self.size and self._timer is None:
            self._timer = self.loop.later(delay, self.refill)

    def refill(self) -> None:
        """Request forks until the pool (ready and starting) is full."""
        self._timer = None
        while len(self.ready) + self.starting < self.size:
            # ":" is outside the alphabet of the handles clients pick.
            fork = PoolFork(f"pool:{next(self._numbers)}")
            if not self.request_fork(fork):
                return
            self.starting += 1

    def refused(self) -> None:
        """The zygote refused a pool fork (thread policy): back off."""
        self.starting -= 1
        self._refused_delay = min(max(REFUSED_DELAY, self._refused_delay * 2), REFUSED_DELAY_CAP)
        self.refill_soon(self._refused_delay)

    def add(self, worker: Worker) -> None:
        """A pool child reported ready."""
        self._refused_delay = 0.0
        self.starting -= 1
        worker.pooled = True
        self.ready.append(worker)

    def lost(self, worker: Worker | None = None) -> None:
        """A pool child (or its fork) failed before ready, or died idle."""
        if worker is not None and worker.pooled:
            worker.pooled = False
            self.ready.remove(worker)
        else:
            self.starting -= 1
        self.refill_soon()

    def retire(self, worker: Worker) -> None:
        """Let a pool child go: closing its channel tells it to exit."""
        if worker.pooled:
            worker.pooled = False
            self.ready.remove(worker)
        if not worker.retired:
            worker.retired = True
            self.close_channel(worker)

    def retire_stale(self, current: ZygoteProc | None) -> None:
        """Let go of ready children of a zygote that is no longer current."""
        stale = [worker for worker in self.ready if worker.zygote is not current]
        for worker in stale:
            self.retire(worker)
        if stale:
            self.refill_soon()

    def retire_all(self) -> None:
        self.size = 0
        for worker in list(self.ready):
            self.retire(worker)
