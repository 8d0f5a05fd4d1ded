"""`Handle`: one spawned job, as a client follows it, and `ExitInfo`.

A handle holds what the server pushed for its job (the `Result`, then the
`Exited` report) and waits through its client for what has not come yet.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .errors import (
    ServerUnavailable,
    TaskError,
    TaskTimeout,
    WorkerLost,
    ZygoteError,
    ZygoteTimeout,
)
from .protocol import EXITED, LOST, OK, RAISED, Exited, Kill, Result

if TYPE_CHECKING:
    from .client import Zygote

__all__ = ["ExitInfo", "Handle"]


@dataclass(frozen=True)
class ExitInfo:
    """How a worker process ended (`Handle.wait()`)."""

    pid: int
    exit_code: int | None
    signal: int | None
    description: str  # in words: "exited normally", "killed by SIGSEGV (core dumped)"
    duration: float  # seconds from the fork request to the exit
    utime: float
    stime: float
    maxrss_kb: int


class Handle:
    """One spawned job. Made by `Zygote.spawn()` or `Zygote.attach()`."""

    def __init__(
        self, client: Zygote, id: str, pid: int, generation: int, warnings: list[str]
    ) -> None:
        self.id = id
        self.pid = pid
        self.generation = generation
        #: fork-safety warnings the zygote attached to this spawn
        self.warnings = warnings
        self._client = client
        self._result: Result | None = None
        self._exited: Exited | None = None
        self._collected = False  # the server was told it may forget the result

    def __repr__(self) -> str:
        state = "done" if self._result is not None else "running"
        return f"<Handle {self.id} pid={self.pid} generation={self.generation} {state}>"

    def done(self) -> bool:
        """True once the result is known (never blocks)."""
        if self._result is None:
            self._client._receive_ready()
        return self._result is not None

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; raises TaskError, WorkerLost, TaskTimeout,
        or ZygoteTimeout if `timeout` seconds pass first.

        The server keeps a result until `result()` or `wait()` has returned
        it here; a handle dropped unread leaves it there for `attach()`."""
        if self._result is None:
            self._client._wait(lambda: self._result is not None, timeout, follow=self.id)
        assert self._result is not None
        self._client._confirm(self)
        return _outcome(self._result)

    def wait(self, timeout: float | None = None) -> ExitInfo:
        """Wait for the worker process to end; its exit status and usage."""
        if self._exited is None:
            self._client._wait(lambda: self._exited is not None, timeout, follow=self.id)
        e = self._exited
        assert e is not None
        if self._result is not None:
            self._client._confirm(self)
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
        try:
            self._client._call(lambda req: Kill(req, self.id, int(signal)), self._client.timeout)
        except (ZygoteTimeout, ServerUnavailable):
            raise
        except ZygoteError:  # the server's answer: no running worker
            return False
        return True


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
        raise WorkerLost(result.message, exit_code=result.exit_code, signal=result.signal)
    raise TaskTimeout(result.message, exit_code=result.exit_code, signal=result.signal)
