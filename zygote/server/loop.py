"""The supervisor's event loop: ZeroMQ sockets and plain descriptors in one
poll, callbacks per descriptor, and deadlines. Single-threaded."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from .timers import Timer, Timers

Handler = Callable[[], object]
log = logging.getLogger("zygote.supervisor")


class EventLoop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.poller = zmq.Poller()
        self.now = clock  # the server's one clock: deadlines, durations
        self.timers = Timers(clock)
        self._handlers: dict[Any, Handler] = {}
        self._after_turn: list[Handler] = []
        self.internal_errors = 0

    def watch(self, source: Any, handler: Handler, flags: int = zmq.POLLIN) -> None:
        """Call `handler()` whenever `source` (an fd or a ZeroMQ socket) is ready."""
        self._handlers[source] = handler
        self.poller.register(source, flags)

    def modify(self, source: Any, flags: int) -> None:
        self.poller.modify(source, flags)

    def unwatch(self, source: Any) -> None:
        if self._handlers.pop(source, None) is not None:
            self.poller.unregister(source)

    def watching(self, source: Any) -> bool:
        return source in self._handlers

    def after_each_turn(self, callback: Handler) -> None:
        """Call `callback()` at the end of every `run_once`, after the
        handlers and timers: to send what they gathered before waiting."""
        self._after_turn.append(callback)

    def later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Call `callback(*args)` after `delay` seconds (cancel the Timer to not)."""
        return self.timers.add(delay, self._guarded, callback, *args)

    def run_once(self, cap: float) -> None:
        """Wait up to `cap` seconds (less if a timer is due sooner), then run
        the handlers of everything ready and every timer due."""
        delay = self.timers.next_delay()
        timeout = cap if delay is None else min(delay, cap)
        # Round up: waking a hair early would spin until the timer is due.
        events = self.poller.poll(int(timeout * 1000) + (delay is not None))
        # Take the handlers now: one of them may close a descriptor whose
        # number another source reuses before its turn in this batch.
        ready = [(source, self._handlers.get(source)) for source, _ in events]
        for source, handler in ready:
            if handler is not None and self._handlers.get(source) is handler:
                self._guarded(handler)
        self.timers.run_due()
        for callback in self._after_turn:
            self._guarded(callback)

    def _guarded(self, callback: Callable[..., object], *args: Any) -> None:
        # A bug in handling one event must not take the server down: that
        # would kill every worker (their lifelines) and lose every result.
        # Log it loudly, count it, carry on.
        try:
            callback(*args)
        except Exception:
            self.internal_errors += 1
            log.exception(
                "internal error in %s; carrying on", getattr(callback, "__qualname__", callback)
            )
