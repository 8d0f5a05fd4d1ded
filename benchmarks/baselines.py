"""What a user has without zygote, measured in a helper process with the same
preload: multiprocessing's fork, forkserver and spawn start methods, and a
fresh `python` per job. Each sample is one process started, its trivial
task's reply received.

The helper is its own process so that the process measuring zygote spawns
never forks (see benchmarks/floor.py). `BaselineProbe().sample(method)`.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import subprocess
import sys
import time
from types import TracebackType

from .common import PRELOAD, REPO

METHODS = ("mp fork", "mp forkserver", "mp spawn", "fresh python")


class BaselineProbe:
    def __enter__(self) -> BaselineProbe:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.baselines", *PRELOAD],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("baseline probe did not start")
        return self

    def sample(self, method: str) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(method + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(60)


def _one_process(context: multiprocessing.context.BaseContext, spawn: bool) -> float:
    from . import jobs

    receiver, sender = context.Pipe(duplex=False)
    target = jobs.preload_and_reply if spawn else jobs.reply
    start = time.perf_counter()
    process = context.Process(target=target, args=(sender,))  # type: ignore[attr-defined]
    process.start()
    receiver.recv()
    elapsed = time.perf_counter() - start
    process.join()
    receiver.close()
    sender.close()
    return elapsed


def _fresh_python() -> float:
    code = "import " + ", ".join(PRELOAD)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return time.perf_counter() - start


def main() -> None:
    for module in sys.argv[1:]:
        importlib.import_module(module)
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(list(sys.argv[1:]))
    contexts = {
        "mp fork": (multiprocessing.get_context("fork"), False),
        "mp forkserver": (forkserver, False),
        "mp spawn": (multiprocessing.get_context("spawn"), True),
    }
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    for line in sys.stdin:
        method = line.strip()
        if method == "fresh python":
            elapsed = _fresh_python()
        else:
            context, spawn = contexts[method]
            elapsed = _one_process(context, spawn)
        print(repr(elapsed), flush=True)


if __name__ == "__main__":
    main()
