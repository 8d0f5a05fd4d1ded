"""`Handle`: one spawned job, as a client follows it, and `ExitInfo`.

A handle holds what the server pushed for its job (its `Output` as it
comes, the `Result`, then the `Exited` report) and waits through its client
for what has not come yet.
"""

from __future__ import annotations

import collections
import contextlib
import signal as _signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import (
    TaskError,
    TaskTimeout,
    WorkerLost,
)
from .protocol import EXITED, LOST, OK, RAISED, Exited, Output, Result

__all__ = ["Delivery", "ExitInfo", "Handle", "Link"]

#: Output not yet read through `Handle.output()` is kept up to this many
#: bytes per job (the oldest dropped first), so that a caller who only
#: wants the result does not hold a chatty job's whole output.
UNREAD_OUTPUT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ExitInfo:
    """How a worker process ended (`Handle.wait()`).

    `maxrss_kb` is the worker's peak resident set size in KiB (getrusage's
    ru_maxrss). A forked worker starts with the zygote's resident pages
    counted as its own, shared or not, so it reflects the zygote's size plus
    what the task added: an `add(1, 2)` from a 19 MiB zygote shows ~16 MiB.
    For the task's own use, compare it with a trivial task's figure, or see
    the workers' USS in `zygote status`."""

    pid: int
    exit_code: int | None
    signal: int | None
    description: str  # in words: "exited normally", "killed by SIGSEGV (core dumped)"
    duration: float  # seconds from the fork request to the exit
    utime: float  # CPU seconds, user and system
    stime: float
    maxrss_kb: int  # peak RSS, the inherited zygote pages included (see above)


@dataclass(eq=False)
class Delivery:
    """What the server pushed for one job. The client writes it as messages
    arrive; the job's handles read it."""

    pid: int
    result: Result | None = None
    exited: Exited | None = None
    collected: bool = False  # the server was told it may forget the result
    #: output pieces not yet read, (stream, data), oldest first
    output: collections.deque[tuple[str, bytes]] = field(default_factory=collections.deque)
    output_bytes: int = 0  # of them
    #: bytes of the job's output seen so far (an attach sends some again)
    output_seen: int = 0
    #: someone iterates output(): then nothing is dropped (it is being read)
    reading: bool = False
    #: bytes dropped, oldest first, while nobody read them (over the bound)
    output_dropped: int = 0

    def take(self, msg: Result | Exited | Output) -> None:
        if isinstance(msg, Output):
            self._take_output(msg)
        elif isinstance(msg, Result):
            self.result = self.result or msg  # the first word stands
        else:
            self.exited = msg

    def _take_output(self, msg: Output) -> None:
        if self.result is not None:
            return  # an attach's replay, after the result: read already
        skip = self.output_seen - msg.offset  # what we have of it already
        data = msg.data[skip:] if skip > 0 else msg.data
        if not data:
            return
        self.output_seen = msg.offset + len(msg.data)
        self.output.append((msg.stream, data))
        self.output_bytes += len(data)
        # Bounded only while nobody reads: a reader that falls behind for a
        # moment (ZeroMQ hands over everything that arrived) loses nothing.
        while not self.reading and self.output_bytes > UNREAD_OUTPUT_BYTES and len(self.output) > 1:
            dropped = len(self.output.popleft()[1])
            self.output_bytes -= dropped
            self.output_dropped += dropped

    def next_output(self) -> tuple[str, bytes] | None:
        """The oldest piece of output not yet read, taken; None if none."""
        if not self.output:
            return None
        piece = self.output.popleft()
        self.output_bytes -= len(piece[1])
        return piece

    def lost(self, handle_id: str, why: str) -> None:
        """The server no longer knows the job: end every wait on it with that."""
        self.take(Result(handle_id, LOST, message=f"the server lost track of this job: {why}"))
        if self.exited is None:
            self.take(Exited(handle_id, self.pid, None, None, f"unknown: {why}", 0.0))


@dataclass(frozen=True)
class Link:
    """What a handle needs from the client it came from (its methods)."""

    #: take in whatever has arrived, without blocking
    poll: Callable[[], None]
    #: take in messages until done(), probing the server about a job: (done, timeout, job)
    wait_for: Callable[[Callable[[], bool], float | None, str], None]
    #: the result reached user code, the server may forget it: (job, its delivery)
    confirm: Callable[[str, Delivery], None]
    #: signal the job's worker; False if it no longer runs: (job, signal)
    kill: Callable[[str, int], bool]


class Handle:
    """One spawned job. Made by `Zygote.spawn()` or `Zygote.attach()`."""

    def __init__(
        self,
        link: Link,
        id: str,
        pid: int,
        generation: int,
        warnings: list[str],
        delivery: Delivery,
    ) -> None:
        self.id = id
        self.pid = pid
        self.generation = generation
        #: fork-safety warnings the zygote attached to this spawn
        self.warnings = warnings
        self._link = link
        self._delivery = delivery

    def __repr__(self) -> str:
        state = "done" if self._delivery.result is not None else "running"
        return f"<Handle {self.id} pid={self.pid} generation={self.generation} {state}>"

    def done(self) -> bool:
        """True once the result is known (never blocks)."""
        if self._delivery.result is None:
            self._link.poll()
        return self._delivery.result is not None

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; raises TaskError, WorkerLost, TaskTimeout,
        or ZygoteTimeout if `timeout` seconds pass first.

        The server keeps a result until `result()` or `wait()` has returned
        it here; a handle dropped unread leaves it there for `attach()`."""
        delivery = self._delivery
        if delivery.result is None:
            self._link.wait_for(lambda: delivery.result is not None, timeout, self.id)
        assert delivery.result is not None
        self._link.confirm(self.id, delivery)
        return _outcome(delivery.result)

    def wait(self, timeout: float | None = None) -> ExitInfo:
        """Wait for the worker process to end; its exit status and usage."""
        delivery = self._delivery
        if delivery.exited is None:
            self._link.wait_for(lambda: delivery.exited is not None, timeout, self.id)
        e = delivery.exited
        assert e is not None
        if delivery.result is not None:
            self._link.confirm(self.id, delivery)
        return ExitInfo(
            e.pid,
            e.exit_code,
            e.signal,
            e.description,
            e.duration,
            e.utime,
            e.stime,
            e.maxrss_kb,
        )

    def kill(self, signal: int = _signal.SIGTERM) -> bool:
        """Send `signal` to the worker; False if it is no longer running."""
        return self._link.kill(self.id, int(signal))

    @property
    def output_dropped(self) -> int:
        """Bytes of the job's output dropped, oldest first, because nobody read
        them and more than 16 MiB had come (0 while `output()` is iterated)."""
        return self._delivery.output_dropped

    def output(self, timeout: float | None = None) -> Iterator[tuple[str, bytes]]:
        """What the task writes, as it comes: ("stdout" or "stderr", bytes)
        pieces, until the job's result is known (then `result()` has it).
        Each piece is yielded once; what came before the call is yielded
        first (after an `attach`, the last 64 KiB the server kept). Raises
        ZygoteTimeout if the job is not over within `timeout` seconds.
        Unread, a job's output is kept up to 16 MiB (the oldest dropped,
        counted in `output_dropped`); while this iterates, all of it."""
        delivery = self._delivery
        delivery.reading = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._link.poll()
            while (piece := delivery.next_output()) is not None:
                yield piece
            if delivery.result is not None:
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._link.wait_for(
                lambda: bool(delivery.output) or delivery.result is not None, left, self.id
            )


def relay_output(stream: str, data: bytes) -> None:
    """Write a piece of a task's output to our own stdout or stderr, as text
    (they may be a logging proxy, like a Celery worker's)."""
    out = sys.stdout if stream == "stdout" else sys.stderr
    with contextlib.suppress(ValueError, OSError):  # closed, or gone
        out.write(data.decode("utf-8", "replace"))
        out.flush()


def _outcome(result: Result) -> Any:
    if result.outcome == OK:
        return msgpack.unpackb(result.value or b"\xc0", raw=False, strict_map_key=False)
    if result.outcome == RAISED:
        raise TaskError(
            result.message,
            exc_type=result.exc_type or "Exception",
            remote_traceback=result.traceback,
        )
    if result.outcome == EXITED:
        if not result.exit_code:
            return None
        raise TaskError(
            result.message or f"the task called sys.exit({result.exit_code})",
            exc_type="SystemExit",
            exit_code=result.exit_code,
        )
    if result.outcome == LOST:
        raise WorkerLost(
            result.message, exit_code=result.exit_code, signal=result.signal, limit=result.limit
        )
    raise TaskTimeout(result.message, exit_code=result.exit_code, signal=result.signal)
