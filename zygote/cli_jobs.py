"""The job commands of `zygote`: spawn, jobs, kill, result, map.

Exit statuses (`spawn`, `result`, `map`): 0 the task returned, 1 it raised
(or the server could not be asked), 2 a usage error, 3 its worker was lost
(killed, timed out, died), 4 no such job, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import click

from .batch import Batch, Call, submit
from .config import ConfigError, signal_by_name
from .errors import TaskError, WorkerLost, ZygoteError

EXIT_RAISED, EXIT_LOST, EXIT_UNKNOWN = 1, 3, 4

endpoint_option = click.option(
    "--endpoint", envvar="ZYGOTE_ENDPOINT", show_envvar=True, help="Server endpoint."
)


def parse_arg(text: str) -> Any:
    """A command-line argument: JSON if it parses as JSON, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _client(endpoint: str | None, timeout: float | None = None) -> Any:
    from .client import Zygote

    return Zygote(endpoint, timeout=timeout)


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _relay_output(handle: Any, timeout: float | None = None) -> None:
    """Write the job's stdout to ours and its stderr to ours, as it comes."""
    streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    last = b"\n"
    for stream, data in handle.output(timeout):
        out = streams.get(stream, sys.stderr.buffer)
        out.write(data)
        out.flush()
        if out is sys.stdout.buffer:
            last = data[-1:]
    if last != b"\n":  # the result on a line of its own
        sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()


def _print_outcome(get: Any) -> None:
    """Print a job's result as JSON, or say how it failed and exit with its status."""
    try:
        value = get()
    except TaskError as exc:
        if "\n" in exc.remote_traceback.strip():  # frames, not the bare line repeated
            click.echo(exc.remote_traceback.rstrip(), err=True)
        _fail(f"task failed: {exc}", EXIT_RAISED)
    except WorkerLost as exc:
        _fail(f"worker lost: {exc}", EXIT_LOST)
    else:
        click.echo(json.dumps(value, default=repr))


@click.command()
@click.argument("task")
@click.argument("args", nargs=-1)
@click.option(
    "--kw",
    "kwargs",
    multiple=True,
    metavar="NAME=VALUE",
    help="Keyword argument (repeatable); VALUE is read like ARG.",
)
@click.option("--timeout", type=float, help="Kill the task after this many seconds.")
@click.option("--profile", help="The zygote lineage to fork it from (start --profile).")
@click.option(
    "--detach", is_flag=True, help="Print the job id and return; `zygote result ID` later."
)
@endpoint_option
def spawn(
    task: str,
    args: tuple[str, ...],
    kwargs: tuple[str, ...],
    timeout: float | None,
    profile: str | None,
    detach: bool,
    endpoint: str | None,
) -> None:
    """Run TASK ("package.module:function") with ARGs and print its result as JSON.

    What the task writes to its stdout and stderr comes out on ours as it
    is written, before the result.

    Each ARG is read as JSON when it parses as JSON (5, 2.5, true, [1,2],
    {"a":1}, "\\"quoted\\""), else taken as a string.
    """
    keywords = {}
    for item in kwargs:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise click.BadParameter(f"expected NAME=VALUE, not {item!r}", param_hint="--kw")
        keywords[name] = parse_arg(value)
    values = tuple(map(parse_arg, args))
    try:
        with _client(endpoint) as client:
            if detach:
                options = {"timeout": timeout, "profile": profile}
                click.echo(submit(client, task, values, keywords, **options))
                return
            handle = client.spawn(task, *values, _timeout=timeout, _profile=profile, **keywords)
            _relay_output(handle)
            _print_outcome(handle.result)
    except (ZygoteError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print them as JSON.")
@endpoint_option
def jobs(as_json: bool, endpoint: str | None) -> None:
    """List the jobs queued and running: id, task, state, pid, profile and
    generation, seconds waited and run (on tcp: your key's)."""
    try:
        with _client(endpoint, timeout=10.0) as client:
            listing = client.jobs()
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    if not listing:
        click.echo("no jobs queued or running")
        return
    rows = [("ID", "TASK", "STATE", "PID", "PROFILE/GEN", "WAITED", "RUNTIME")]
    for job in listing:
        generation = job["generation"] if job["generation"] is not None else "-"
        runtime = "-" if job["runtime"] is None else f"{job['runtime']:.1f}s"
        pid = job["pid"] or "-"
        profile = f"{job['profile']}/{generation}"
        waited = f"{job['waited']:.1f}s"
        rows.append((job["id"], job["task"], job["state"], str(pid), profile, waited, runtime))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


@click.command()
@click.argument("job_id")
@click.option("--signal", "sig", default="SIGTERM", show_default=True, help="Signal to send.")
@endpoint_option
def kill(job_id: str, sig: str, endpoint: str | None) -> None:
    """Send a signal to the worker of job JOB_ID (a queued job never starts)."""
    try:
        signum = signal_by_name(sig)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--signal") from None
    try:
        with _client(endpoint, timeout=10.0) as client:
            sent = client.kill(job_id, signum)
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None
    if not sent:
        _fail(f"no job {job_id} is queued or running", EXIT_UNKNOWN)
    click.echo(f"sent {signum.name} to job {job_id}")


@click.command()
@click.argument("job_id")
@click.option("--timeout", type=float, help="Seconds to wait for it [default: no bound].")
@endpoint_option
def result(job_id: str, timeout: float | None, endpoint: str | None) -> None:
    """Wait for job JOB_ID (from `spawn --detach`) and print its result as
    JSON, after its output: the last 64 KiB the server kept, then the rest
    as it comes."""
    try:
        with _client(endpoint) as client:
            try:
                handle = client.attach(job_id)
            except ZygoteError as exc:
                if "unknown handle" not in str(exc):
                    raise
                _fail(str(exc).removeprefix("unknown_handle: "), EXIT_UNKNOWN)
            _relay_output(handle, timeout)
            _print_outcome(lambda: handle.result(timeout))
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None


def _calls(lines: Iterator[str], failures: list[str]) -> Iterator[Call | None]:
    """The calls in a JSON-lines file: a list of arguments, or an object with
    "args" and "kwargs". A bad line is reported and yields None."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if isinstance(item, list):
                yield tuple(item), {}
                continue
            if isinstance(item, dict) and set(item) <= {"args", "kwargs"}:
                args, kwargs = item.get("args", []), item.get("kwargs", {})
                if isinstance(args, list) and isinstance(kwargs, dict):
                    yield tuple(args), kwargs
                    continue
            raise ValueError('expected a list of arguments or {"args": [...], "kwargs": {...}}')
        except ValueError as exc:
            failures.append(f"line {number}: {exc}")
            yield None


class Progress:
    """A one-line progress bar on stderr, when stderr is a terminal."""

    def __init__(self, total: int | None) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.shown = sys.stderr.isatty()
        self.started = self.drawn = time.monotonic()

    def step(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.shown and (time.monotonic() - self.drawn > 0.1 or self.done == self.total):
            self.draw()

    def draw(self) -> None:
        self.drawn = time.monotonic()
        rate = self.done / max(self.drawn - self.started, 1e-9)
        failed = f", {self.failed} failed" if self.failed else ""
        if self.total:
            filled = 30 * self.done // self.total
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done} done"
        sys.stderr.write(f"\r\x1b[K{bar}{failed}  {rate:.1f}/s")
        sys.stderr.flush()

    def output(self, stream: str, data: bytes) -> None:
        """A job's output, on stderr (stdout holds the results), above the bar."""
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
        if self.shown:
            self.draw()

    def say(self, text: str) -> None:
        """A line of its own, above the bar."""
        if self.shown:
            sys.stderr.write("\r\x1b[K")
        click.echo(text, err=True)
        if self.shown:
            self.draw()

    def close(self) -> None:
        if self.shown:
            self.draw()
            sys.stderr.write("\n")


@click.command(name="map")
@click.argument("task")
@click.option(
    "--args-file",
    type=click.File("r"),
    required=True,
    help='JSON lines, each a list of arguments or {"args": [...], "kwargs": {...}}; - for stdin.',
)
@click.option(
    "--max-in-flight", type=click.IntRange(1), help="Jobs at once [default: max-workers]."
)
@click.option("--timeout", type=float, help="Seconds the whole run may take.")
@click.option("--profile", help="The zygote lineage to fork them from.")
@endpoint_option
def map_(
    task: str,
    args_file: IO[str],
    max_in_flight: int | None,
    timeout: float | None,
    profile: str | None,
    endpoint: str | None,
) -> None:
    """Run TASK once per line of --args-file and print the results as JSON
    lines, in input order. A failed line prints null and says why on
    stderr; the exit status is then 1. Ctrl-C cancels the jobs not done."""
    lines: IO[str] | list[str] = args_file
    total = None
    if args_file is not sys.stdin and args_file.seekable():
        lines = args_file.readlines()
        total = sum(1 for line in lines if line.strip())
    problems: list[str] = []
    progress = Progress(total)
    items = _calls(iter(lines), problems)
    bad: list[int] = []  # positions of unreadable lines, in order

    def good() -> Iterator[Call]:
        for position, call in enumerate(items):
            if call is None:
                bad.append(position)
            else:
                yield call

    failed = 0
    try:
        with _client(endpoint) as client:
            outcomes = Batch(
                client,
                task,
                good(),
                max_in_flight,
                timeout,
                profile,
                return_errors=True,
                on_output=progress.output,
            )
            try:
                failed = _write_results(outcomes, bad, problems, progress)
            except (KeyboardInterrupt, BrokenPipeError):
                outcomes.cancel()  # also when interrupted between two results
                raise
    except KeyboardInterrupt:
        progress.close()
        _fail("interrupted: the batch's queued jobs cancelled, its running ones stopped", 130)
    except BrokenPipeError:
        # Whoever read our stdout is gone (| head): say so where it can be seen.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        progress.close()
        _fail("stdout closed: the batch's queued jobs cancelled, its running ones stopped", 1)
    except ZygoteError as exc:
        progress.close()
        raise click.ClickException(str(exc)) from None
    progress.close()
    if failed:
        _fail(f"{failed} of {progress.done} failed", EXIT_RAISED)


def _write_results(
    outcomes: Iterator[Any], bad: list[int], problems: list[str], progress: Progress
) -> int:
    """Write the results as JSON lines, unreadable lines in their places;
    the number that failed."""
    failed = 0
    position = 0

    def unreadable() -> None:
        nonlocal failed
        failed += 1
        progress.say(problems.pop(0))
        click.echo("null")
        progress.step(True)

    for outcome in outcomes:
        while bad and bad[0] == position:  # the unreadable lines keep their place
            bad.pop(0)
            unreadable()
            position += 1
        if isinstance(outcome, ZygoteError):
            failed += 1
            progress.say(f"item {position + 1}: {outcome}")
            click.echo("null")
        else:
            click.echo(json.dumps(outcome, default=repr))
        progress.step(isinstance(outcome, ZygoteError))
        position += 1
    while problems:  # unreadable lines after the last call
        unreadable()
    return failed


COMMANDS = [spawn, jobs, kill, result, map_]
