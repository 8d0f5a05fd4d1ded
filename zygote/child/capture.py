"""A worker's stdout and stderr, captured for its job.

The zygote makes two pipes per child before the fork (with the channel and
the lifeline, off the request path); the child puts their write ends on
descriptors 1 and 2 first thing, and the supervisor reads the other ends
and streams what comes to the job's clients. A ready-pool child does it
before it is ready, so a pooled task pays nothing for it.

A refork candidate that becomes a zygote gets the server's stdout and
stderr back with its Promote (`restore`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys


def pipes() -> tuple[int, int, int, int]:
    """(stdout read end, stdout write end, stderr read end, stderr write end)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    return out_r, out_w, err_r, err_w


def redirect(out_w: int, err_w: int) -> None:
    """In a new child: its stdout and stderr become the pipes (the Python
    streams keep their objects: they write to descriptors 1 and 2)."""
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)


def line_buffered_stdout() -> None:
    """In the zygote, at boot: make stdout line-buffered, so that a worker's
    prints reach its client as they happen (stderr always is). Done once
    here, so that no child pays for it."""
    stream = sys.stdout
    if isinstance(stream, io.TextIOWrapper) and not stream.line_buffering:
        with contextlib.suppress(OSError, ValueError):
            stream.reconfigure(line_buffering=True)


def restore(fds: list[int]) -> None:
    """In a worker promoted to a zygote: back to the server's stdout and
    stderr (`fds`, sent with the Promote; its job's pipes are closed)."""
    flush()
    for target, fd in zip((1, 2), fds, strict=False):
        os.dup2(fd, target)
        os.close(fd)


def flush() -> None:
    """Flush the Python-level stdout and stderr buffers into the pipes."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
