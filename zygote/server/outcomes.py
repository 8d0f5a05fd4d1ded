"""What a job's life produces on the supervisor's side, as data: the task a
worker is sent, the result of a worker that sent none, the report of how its
process ended; to whom they are reported (`Clients`); and the counters. No
I/O."""

from __future__ import annotations

import collections
from typing import Any, Protocol

from ..codec import decode_channel, encode, frame
from ..protocol import LOST, OK, TIMEOUT, ErrorCode, Exited, Result, Task
from .children import Child, Job


class Clients(Protocol):
    """What the spawner tells the clients' side (the supervisor, which alone
    writes the records clients read)."""

    def job_started(self, handle: str, pid: int, generation: int, warnings: list[str]) -> None: ...
    def job_result(self, handle: str, data: bytes) -> None: ...
    def job_ended(self, handle: str, result: bytes | None, exited: bytes) -> None: ...
    def job_failed(self, handle: str, code: ErrorCode, text: str, reasons: list[str]) -> None: ...


class Counts(collections.Counter[str]):
    """The spawner's counters, for `zygote status`."""

    NAMES = ("accepted", "completed", "failed_starts", "refused_forks")

    def __init__(self) -> None:
        super().__init__()
        self.by_step: collections.Counter[str] = collections.Counter()  # failed starts
        self.guard_wait_seconds = 0.0

    def guards(self, waited: float, missed: bool) -> None:
        """A fork waited `waited` s for the fork guards; it went without some."""
        if waited:
            self["fork_guard_waits"] += 1
            self.guard_wait_seconds += waited
        if missed:
            self["fork_guard_timeouts"] += 1

    def stats(self) -> dict[str, Any]:
        return {
            **{name: self[name] for name in self.NAMES},
            "validator_failures": dict(self.by_step),
            "fork_guard_waits": self["fork_guard_waits"],
            "fork_guard_wait_seconds": round(self.guard_wait_seconds, 3),
            "fork_guard_timeouts": self["fork_guard_timeouts"],
        }


def task_frame(job: Job, candidate: bool) -> bytes:
    """The framed Task for a worker's channel."""
    spawn = job.spawn
    return frame(
        encode(Task(job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd, candidate))
    )


def missing_result(job: Job, child: Child, code: int | None, sig: int | None, words: str) -> bytes:
    """The Result of a worker that ended without sending one: lost, or killed
    at its time limit."""
    outcome, what = LOST, words
    if child.timed_out:
        outcome, what = TIMEOUT, f"ran past its {job.spawn.timeout:g}s timeout and was killed"
    message = f"worker {child.pid} running {job.spawn.task} {what}"
    return encode(Result(job.handle, outcome, message=message, exit_code=code, signal=sig))


def exit_report(
    job: Job, child: Child, code: int | None, sig: int | None, words: str, lifetime: float
) -> bytes:
    """The Exited report: how the job's process ended, in numbers and words."""
    return encode(Exited(job.handle, child.pid, code, sig, words, lifetime, *child.rusage))


def succeeded(data: bytes) -> bool:
    """Did the task whose encoded Result this is return normally? (Decoded in
    full, a copy of the value: asked for a refork candidate only.)"""
    result = decode_channel(data)
    return isinstance(result, Result) and result.outcome == OK
