"""Tasks the tests run in workers. Preloaded by the test servers."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from pathlib import Path

# Where a test wants to know which processes imported this module.
_marker = os.environ.get("ZYGOTE_TEST_IMPORT_MARKER")
if _marker:
    with open(_marker, "a") as f:
        f.write(f"{os.getpid()}\n")


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def identity(x):
    return x


def slow_identity(x, seconds=0.05):
    time.sleep(seconds)
    return x


def whoami():
    return {"pid": os.getpid(), "ppid": os.getppid()}


def raise_value_error(text="bad value"):
    raise ValueError(text)


def abort():
    os.abort()


def segfault():
    ctypes.string_at(0)


def exit_with(code):
    sys.exit(code)


def hard_exit(code):
    os._exit(code)


def sleep(seconds, value=None):
    time.sleep(seconds)
    return value


def sleep_then_touch(seconds, path):
    """Sleep, then leave proof that the task ran to its end."""
    time.sleep(seconds)
    Path(path).write_text(str(os.getpid()))
    return os.getpid()


def wait_for_file(path, timeout=30.0):
    """Block until `path` exists (the test's go signal); return its pid."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return os.getpid()


def unserializable():
    return object()


def env(name):
    return os.environ.get(name)


def cwd():
    return os.getcwd()


def threads():
    return threading.active_count()


def big_result(size):
    return b"x" * size


def ignore_sigterm_and_sleep(seconds):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


class Nested:
    @staticmethod
    def method(x):
        return x * 2


not_callable = 42


def open_fds():
    """This process's open descriptors and what each one is."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        # The listing's own descriptor is closed by the time we look at it.
        with contextlib.suppress(FileNotFoundError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def append_pid(path):
    """Record a run of this task: one line per run."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def loaded(module):
    """Was `module` imported before this task ran (by the preload)?"""
    return module in sys.modules


def module_file(name):
    """Where `name` is imported from, in this worker."""
    import importlib

    return importlib.import_module(name).__file__


def nap(seconds=0.2):
    """Sleep a little, never long (the fuzzer's task to kill mid-run)."""
    time.sleep(min(max(float(seconds), 0.0), 0.3))
    return seconds
