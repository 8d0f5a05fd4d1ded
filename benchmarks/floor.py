"""The fork floor, measured in a process of its own: raw os.fork() -> the
child's first instruction, from a parent with the same imports as the zygote.

Run as a helper process by the benchmarks (`FloorProbe`), so that the process
that measures spawns never forks: a fork leaves the parent's pages
write-protected, and its next few hundred writes fault — a cost that would
land on the client's side of the spawns being compared.
"""

from __future__ import annotations

import gc
import importlib
import os
import struct
import subprocess
import sys
import time
from types import TracebackType

from .common import PRELOAD, REPO


def fork_once() -> float:
    """Fork, have the child write the clock first thing, return the delay."""
    r, w = os.pipe()
    start = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, struct.pack("q", time.perf_counter_ns()))
        finally:
            os._exit(0)
    os.close(w)
    (child_start,) = struct.unpack("q", os.read(r, 8))
    os.close(r)
    os.waitpid(pid, 0)
    return (child_start - start) / 1e9


class FloorProbe:
    """A helper process holding `preload`; `sample()` forks it once."""

    def __init__(
        self, preload: tuple[str, ...] = PRELOAD, env: dict[str, str] | None = None
    ) -> None:
        self.preload = preload
        self.env = env

    def __enter__(self) -> FloorProbe:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.floor", *self.preload],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **(self.env or {})},
        )
        assert self.process.stdout is not None
        if self.process.stdout.read(5) != b"ready":
            raise RuntimeError("floor probe did not start")
        return self

    def sample(self) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"f")
        self.process.stdin.flush()
        (seconds,) = struct.unpack("d", self.process.stdout.read(8))
        return float(seconds)

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.process.kill()
        self.process.wait()


def main() -> None:
    for module in sys.argv[1:]:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()
    out = sys.stdout.buffer
    out.write(b"ready")
    out.flush()
    while sys.stdin.buffer.read(1) == b"f":
        out.write(struct.pack("d", fork_once()))
        out.flush()


if __name__ == "__main__":
    main()
