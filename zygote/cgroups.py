"""cgroup v2 directories and resource limits: the platform side of per-job
cleanup and worker limits (docs/cleanup-and-limits.md). Linux only; no
ZeroMQ (workers import the rlimit half).

A server that can write to the unified (v2) hierarchy makes one cgroup of
its own under the supervisor's (``<ours>/zygote-<server id>``), with the
zygotes in ``zygotes/`` and every forked child in a cgroup of its own
(``w<N>``). Killing a cgroup (`cgroup.kill`) takes every process in it,
however it was started — plain children, double-forked `setsid` daemons —
which a process group or a parent-child walk cannot promise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from pathlib import Path

__all__ = [
    "Cgroup",
    "apply_rlimits",
    "own_cgroup",
    "unified_mount",
    "writable_base",
]


def _cgroup2_mount(mountinfo: str) -> tuple[list[str], list[str]] | None:
    """The cgroup v2 line of a mountinfo file: (the fields before " - ",
    those after: type, source, super options), or None."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields, _, tail = line.partition(" - ")
        after = tail.split(" ")
        if after[0] == "cgroup2":
            return fields.split(" "), after
    return None


def unified_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on a pure v2
    system, /sys/fs/cgroup/unified on a hybrid one), or None."""
    mount = _cgroup2_mount(mountinfo)
    return None if mount is None else Path(mount[0][4])


def favors_dynmods(mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Is cgroup v2 mounted with `favordynmods` (Linux 6.0+)? Without it the
    kernel makes every move of a process into a cgroup wait for an RCU
    grace period, and a fork that runs meanwhile waits too: measured on a
    quiet machine, a spawn forked on demand took 11 ms instead of 4.3."""
    mount = _cgroup2_mount(mountinfo)
    return mount is not None and len(mount[1]) > 2 and "favordynmods" in mount[1][2].split(",")


def own_cgroup(pid: int | str = "self") -> str | None:
    """This process's cgroup v2 path (the ``0::`` line of /proc/PID/cgroup)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def writable_base() -> tuple[Path | None, str]:
    """The directory of our own cgroup v2, if we may make cgroups under it;
    else None and why not (for the log)."""
    mount, ours = unified_mount(), own_cgroup()
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted"
    if ours is None:
        return None, "this process has no cgroup v2 path"
    base = mount / ours.lstrip("/")
    if not os.access(base, os.W_OK):
        return None, f"{base} is not writable"
    return base, ""


class Cgroup:
    """One cgroup v2 directory. Every method that writes may raise OSError."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"Cgroup({str(self.path)!r})"

    def create(self) -> Cgroup:
        with contextlib.suppress(FileExistsError):
            self.path.mkdir()
        return self

    def child(self, name: str) -> Cgroup:
        return Cgroup(self.path / name).create()

    def write(self, name: str, value: str) -> None:
        # One write(2) per value: cgroup files act on each write call.
        fd = os.open(self.path / name, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def read(self, name: str) -> str:
        with open(self.path / name) as f:
            return f.read()

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def add(self, pid: int) -> None:
        """Move a process (not its children: they stay where they are)."""
        self.write("cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        """The processes in this cgroup and every cgroup below it."""
        pids: list[int] = []
        for directory, _, _ in os.walk(self.path):
            with contextlib.suppress(OSError), open(os.path.join(directory, "cgroup.procs")) as f:
                pids += [int(pid) for pid in f.read().split()]
        return pids

    def populated(self) -> bool:
        try:
            return "populated 1" in self.read("cgroup.events")
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        """SIGKILL everything in it and below. Without `cgroup.kill` (kernels
        before 5.14) the processes are signalled one by one, which a process
        forking fast enough can outrun: repeated until it is empty."""
        try:
            self.write("cgroup.kill", "1")
            return
        except FileNotFoundError:
            if not self.path.exists():
                return
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """rmdir this cgroup and those below it; False while any is still
        busy (killed processes not yet gone) — try again later."""
        try:
            os.rmdir(self.path)  # usually empty, with no cgroups below
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
        done = True
        for directory, _, _ in os.walk(self.path, topdown=False):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                done = False
        return done

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer took for `memory.max`."""
        try:
            for line in self.read("memory.events").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def enable_memory(self) -> bool:
        """Let the cgroups below set `memory.max`; False if the memory
        controller is not available here (not enabled in our parent)."""
        try:
            if "memory" not in self.read("cgroup.controllers").split():
                return False
            self.write("cgroup.subtree_control", "+memory")
        except OSError:
            return False
        return True

    def limit_memory(self, limit: int) -> None:
        """memory.max, no swap beyond it, and the whole cgroup killed at once
        when it is hit (not just the process that asked last)."""
        self.write("memory.max", str(limit))
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
            if self.has(name):
                self.write(name, value)


def apply_rlimits(limits: dict[str, float]) -> None:
    """In a worker, before its task: the limits the kernel enforces per
    process. Soft and hard limits alike, so the task cannot lift them.

    `cpu_seconds` counts from now (a pool child has used some already);
    past it comes SIGXCPU, a second later SIGKILL. `memory` is what the
    task may add to the address space it inherits from the zygote
    (RLIMIT_AS is virtual size, and the zygote's preload is most of it).
    """
    if "cpu_seconds" in limits:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # Whole seconds only: rounded, so a 1 s limit is not 2 s.
        soft = max(1, round(usage.ru_utime + usage.ru_stime + limits["cpu_seconds"]))
        _lower(resource.RLIMIT_CPU, soft, soft + 1)
    if "nofile" in limits:
        count = int(limits["nofile"])
        _lower(resource.RLIMIT_NOFILE, count, count)
    if "memory" in limits:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        total = size + int(limits["memory"])
        _lower(resource.RLIMIT_AS, total, total)


def _lower(which: int, soft: int, hard: int) -> None:
    """Set a limit, never above the hard limit already in force."""
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(which, (soft, hard))


def describe_limit(name: str, value: float) -> str:
    """A limit in words: "memory limit of 209715200 bytes"."""
    if name == "memory":
        return f"memory limit of {int(value)} bytes"
    if name == "nofile":
        return f"open file limit of {int(value)}"
    return f"CPU time limit of {value:g} s"
