"""The errors a zygote client can see.

Every error a server reports arrives as one of these types, so a caller can
catch `ZygoteError` for "anything zygote" or a subclass for one outcome.
"""

from __future__ import annotations

from .protocol import ErrorCode

__all__ = [
    "ServerBusy",
    "ServerUnavailable",
    "SpawnError",
    "TaskError",
    "TaskTimeout",
    "WorkerLost",
    "ZygoteError",
    "ZygoteTimeout",
]


class ZygoteError(Exception):
    """Base class of every error raised by zygote."""


class SpawnError(ZygoteError):
    """No healthy worker could be made for the request.

    `reasons` lists what went wrong with each attempt (a validator that
    failed, a child that died, a deadline), oldest first.
    """

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons: list[str] = list(reasons or [])


class ServerBusy(SpawnError):
    """The server's queue is full: every worker slot is taken and the
    bounded wait queue is too. Retry later or raise `--queue-size`."""


class TaskError(ZygoteError):
    """The task raised. `exc_type` is the remote exception's qualified type
    name, `remote_traceback` its formatted traceback. A task that called
    `sys.exit(n)` with a non-zero `n` also ends here, with
    ``exc_type == "SystemExit"`` and `exit_code` set."""

    def __init__(
        self,
        message: str,
        *,
        exc_type: str,
        remote_traceback: str = "",
        exit_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.args[0]}" if self.args[0] else self.exc_type


class WorkerLost(ZygoteError):
    """The worker died without sending a result: killed by `signal`, or
    exited with `exit_code` (e.g. `os._exit(3)`) before reporting. `limit`
    names the worker limit that ended it, if one did: "memory",
    "cpu_seconds" or "nofile" (docs/cleanup-and-limits.md)."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal
        self.limit = limit


class ServerUnavailable(ZygoteError):
    """No server answers at the endpoint, or it went away mid-request."""


class ZygoteTimeout(ZygoteError, TimeoutError):
    """A wait ran past its deadline. Raised by the client when a call's own
    timeout expires (the task itself keeps running)."""


class TaskTimeout(ZygoteTimeout, WorkerLost):
    """The task ran past its `_timeout` and the server killed it
    (SIGTERM, then SIGKILL after the grace period)."""

    def __init__(
        self, message: str, *, exit_code: int | None = None, signal: int | None = None
    ) -> None:
        WorkerLost.__init__(self, message, exit_code=exit_code, signal=signal)


def error_for(code: str, message: str, reasons: list[str]) -> ZygoteError:
    """The exception for a server's Error reply (its code: protocol.ErrorCode)."""
    if code == ErrorCode.BUSY:
        return ServerBusy(message, reasons)
    if code in (ErrorCode.SPAWN_FAILED, ErrorCode.SHUTTING_DOWN, ErrorCode.NOT_ALLOWED):
        return SpawnError(message, reasons)
    return ZygoteError(f"{code}: {message}")


def silent_server(endpoint: str, answered: bool, seconds: float) -> ServerUnavailable:
    """The error for a server that did not answer a probe: one that never
    said anything is most likely not there at all."""
    if not answered:
        return ServerUnavailable(
            f"no server answered at {endpoint} within {seconds:.0f}s "
            "(is `zygote start` running there, and reachable?)"
        )
    return ServerUnavailable(
        f"the server at {endpoint} stopped answering (no reply for {seconds:.1f}s)"
    )
