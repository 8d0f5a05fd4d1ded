"""Tasks that write to their stdout and stderr (tests/test_output.py)."""

from __future__ import annotations

import os
import sys
import time


def print_then_wait(path: str, timeout: float = 20.0) -> int:
    """Print a line, wait for `path` to exist (the test makes it once it has
    the line: the line came while the task ran), print another."""
    print("first")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("second")
    return 7


def both_streams() -> str:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    sys.stdout.write("no newline at the end")  # flushed before the result
    return "done"


def flood(total: int) -> int:
    """`total` bytes on stdout: numbered 64-byte lines."""
    line = 0
    written = 0
    while written < total:
        text = f"{line:063d}\n"
        sys.stdout.write(text)
        written += len(text)
        line += 1
    return written


def marked(count: int) -> int:
    """`count` lines "line N" on stdout."""
    for n in range(count):
        print(f"line {n}")
    return count


def wait_then_mark(path: str, count: int, timeout: float = 20.0) -> int:
    """Wait for `path` to exist, then `marked(count)`."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return marked(count)
