"""What a job's life produces on the supervisor's side, as data: the task a
worker is sent, the result of a worker that sent none, the report of how its
process ended; to whom they are reported (`Clients`); and the counters. No
I/O."""

from __future__ import annotations

import collections
import logging
import signal
from typing import Any, Protocol

from ..cgroups import describe_limit
from ..codec import decode_channel, encode, frame, ok_result_prefix
from ..protocol import LOST, OK, RAISED, TIMEOUT, ErrorCode, Exited, Result, Task
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


def task_frame(job: Job, candidate: bool, limits: dict[str, float] | None = None) -> bytes:
    """The framed Task for a worker's channel (`limits`: the rlimits it sets)."""
    spawn = job.spawn
    task = Task(
        job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd, candidate, limits or None
    )
    return frame(encode(task))


def missing_result(job: Job, child: Child, code: int | None, sig: int | None, words: str) -> bytes:
    """The Result of a worker that ended without sending one: lost, or killed
    at its time limit."""
    outcome, what = LOST, words
    limit = limit_hit(child, sig)
    if child.timed_out:
        outcome, what = TIMEOUT, f"ran past its {job.spawn.timeout:g}s timeout and was killed"
    elif limit is not None:
        what = f"{words}: it ran past its {describe_limit(limit, child.limits[limit])}"
    message = f"worker {child.pid} running {job.spawn.task} {what}"
    return encode(
        Result(job.handle, outcome, message=message, exit_code=code, signal=sig, limit=limit)
    )


def limit_hit(child: Child, sig: int | None) -> str | None:
    """The limit the kernel ended a worker for, as far as can be told: the
    cgroup's OOM kill count, SIGXCPU, or SIGKILL at the CPU hard limit."""
    if child.limit_hit is not None and child.limit_hit in child.limits:
        return child.limit_hit
    cpu = child.limits.get("cpu_seconds")
    if cpu is not None and sig == signal.SIGXCPU:
        return "cpu_seconds"
    if cpu is not None and sig == signal.SIGKILL and sum(child.rusage[:2]) >= cpu:
        return "cpu_seconds"
    return None


def exit_report(
    job: Job, child: Child, code: int | None, sig: int | None, words: str, lifetime: float
) -> bytes:
    """The Exited report: how the job's process ended, in numbers and words."""
    return encode(Exited(job.handle, child.pid, code, sig, words, lifetime, *child.rusage))


def raised(handle: str, data: bytes) -> str | None:
    """ "raised KeyError" for the encoded Result of a task that raised, else
    None. A value (perhaps big) is told by its start, not decoded."""
    if data.startswith(ok_result_prefix(handle)):
        return None
    result = decode_channel(data)
    if isinstance(result, Result) and result.outcome == RAISED:
        return f"raised {result.exc_type}"
    return None


def job_ended_log(
    job: Job, code: int | None, words: str, lifetime: float, result: bytes | None
) -> tuple[int, str]:
    """The log level and line for how a job ended. A worker that reported
    an exception exits 0: "exited normally" would hide that its task raised."""
    ended = words if job.raised is None else job.raised
    if job.raised is not None and code != 0:
        ended = f"{job.raised}, then {words}"
    level = logging.INFO if code == 0 and result is None and job.raised is None else logging.WARNING
    return level, f"{job.spawn.task} {ended} after {lifetime * 1000:.1f} ms"


def succeeded(data: bytes) -> bool:
    """Did the task whose encoded Result this is return normally? (Decoded in
    full, a copy of the value: asked for a refork candidate only.)"""
    result = decode_channel(data)
    return isinstance(result, Result) and result.outcome == OK
