"""Tasks that leave processes behind, or run into their limits (tests/test_cleanup.py,
tests/test_limits.py)."""

from __future__ import annotations

import os
import resource
import subprocess
import time


def leave_behind(wait: float = 0.0, pidfile: str = "") -> list[int]:
    """Start a plain child and a setsid double-forked daemon, both sleeping;
    return their pids (after `wait` seconds, if given; written to `pidfile`
    first, if given)."""
    plain = subprocess.Popen(["sleep", "300"])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(write, str(os.getpid()).encode())
            os.execvp("sleep", ["sleep", "300"])
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    daemon = int(os.read(read, 64))
    os.close(read)
    if pidfile:
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{plain.pid} {daemon}")
        os.rename(pidfile + ".tmp", pidfile)
    time.sleep(wait)
    return [plain.pid, daemon]


def allocate(size: int) -> int:
    return len(bytearray(size))


def burn_cpu(seconds: float) -> float:
    """Spin until this process has used `seconds` of CPU time."""
    while True:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        if usage.ru_utime + usage.ru_stime > seconds:
            return usage.ru_utime + usage.ru_stime


def open_files(count: int) -> int:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    return len(fds)


def identity() -> list[int]:
    return [os.getuid(), os.getgid(), os.getpid()]


def cgroup(*ballast: object) -> str:
    """This process's cgroup v2 path (`ballast`: to make a request big)."""
    with open("/proc/self/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))
