"""The messages a job's life produces on the supervisor's side, as data: the
task a worker is sent, the result of a worker that sent none, the report of
how its process ended. No I/O."""

from __future__ import annotations

from ..codec import decode_channel, encode, frame
from ..protocol import LOST, OK, TIMEOUT, Exited, Result, Task
from .children import Child, Job


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
