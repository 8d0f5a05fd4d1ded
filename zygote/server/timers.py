"""Deadlines for a single-threaded event loop: a heap with lazy cancellation."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any


def _nothing(*args: Any) -> None:
    pass


class Timer:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        # The heap keeps the timer until its time comes: let go of what it
        # refers to (a worker, a job and its payload) now.
        self.cancelled = True
        self.callback = _nothing
        self.args = ()


class Timers:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def add(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Call `callback(*args)` once `delay` seconds have passed."""
        timer = Timer(self._clock() + delay, callback, args)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    def next_delay(self) -> float | None:
        """Seconds until the next live timer is due (0 if overdue), None if none."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        if not heap:
            return None
        return max(0.0, heap[0][0] - self._clock())

    def run_due(self) -> None:
        now = self._clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback(*timer.args)
