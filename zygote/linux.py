"""Linux system interfaces, kept in one place: prctl, pidfd, /proc, SIGIO lifelines.

zygote relies on features that only Linux has (child subreapers, pidfds,
parent-death signals, /proc), so importing this module anywhere else fails
with a message that says so.
"""

from __future__ import annotations

import sys

if not sys.platform.startswith("linux"):  # pragma: no cover - checked on import elsewhere
    raise ImportError(
        f"zygote runs on Linux only (it needs pidfds, PR_SET_CHILD_SUBREAPER and /proc); "
        f"this is {sys.platform}"
    )

import contextlib
import ctypes
import fcntl
import os
import resource
import signal
import socket
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "Memory",
    "arm_lifeline",
    "child_pids",
    "describe_wait_status",
    "kill_child",
    "lifeline_cut",
    "memory_usage",
    "native_threads",
    "open_fd_count",
    "open_lifeline",
    "raise_open_files_limit",
    "sd_notify",
    "send_signal",
    "set_child_subreaper",
    "set_parent_death_signal",
    "set_process_title",
    "set_thread_name",
    "signal_name",
    "wait_status_parts",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def _find_setproctitle() -> Callable[[str], None] | None:
    """The `proctitle` extra: a full title in /proc/PID/cmdline (ps, top -c)."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - the test extra installs it
        return None
    return setproctitle


_setproctitle = _find_setproctitle()


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_child_subreaper() -> None:
    """Become the reaper of orphaned descendants (workers whose zygote died)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def raise_open_files_limit() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard one; the new soft limit. The
    supervisor holds four descriptors per worker (channel, pidfd, stdout,
    stderr), and 1024, the usual soft default, ends near 250 workers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def set_thread_name(name: str) -> None:
    """Name the calling thread in /proc (`comm`, 15 bytes at most)."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def set_process_title(title: str) -> None:
    """Show `title` in ps: in /proc/PID/cmdline with setproctitle installed,
    and its first 15 bytes as the process name (/proc/PID/comm: ps -o comm,
    top) either way; setproctitle sets that too. Only from the main thread:
    the name is the calling thread's."""
    if _setproctitle is None:
        set_thread_name(title)
    elif _title_ready:  # set up in this process, or in the zygote it was forked from
        _setproctitle(title)
    else:
        _first_title(_setproctitle, title)


_title_ready = False


def _first_title(setproctitle: Callable[[str], None], title: str) -> None:
    """setproctitle's first call sets it up. SPT_NOENV makes it leave the
    environment where it is, so that /proc/PID/environ stays readable (ps e,
    psutil); titles are then cut to the length of the original command line,
    over 100 bytes for every process of the server."""
    global _title_ready
    added = "SPT_NOENV" not in os.environ
    if added:  # for this call only: children must not inherit it
        os.environ["SPT_NOENV"] = "1"
    try:
        setproctitle(title)
    finally:
        if added:
            del os.environ["SPT_NOENV"]
    _title_ready = True


def sd_notify(address: str | None, state: str) -> bool:
    """Send `state` ("READY=1", "STATUS=...") to systemd's $NOTIFY_SOCKET
    `address` (a path, or "@name" in the abstract namespace): one datagram,
    as sd_notify(3) does. False if there is no address or it did not go."""
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent thread exits."""
    _prctl(_PR_SET_PDEATHSIG, sig)


def send_signal(pidfd: int, sig: int) -> bool:
    """Signal a process through its pidfd; False if it has already exited.

    A pidfd names one process for its whole life, so unlike kill(pid) this
    can never hit an unrelated process that was given a recycled pid.
    """
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    return True


def open_lifeline(read_fd: int) -> int:
    """Open a new description of the lifeline pipe's read end, for one child.

    The SIGIO owner set by F_SETOWN belongs to the open file description,
    not to the fd: children sharing one inherited description would leave
    only the last one that registered armed. Re-opening the pipe through
    /proc gives every child a description of its own. O_ASYNC is set now;
    with no owner yet, it sends nothing until `arm_lifeline()`.
    """
    fd = os.open(f"/proc/self/fd/{read_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    return fd


def arm_lifeline(fd: int, pid: int) -> None:
    """Make the kernel send SIGIO (default action: terminate) to `pid` when
    the lifeline's only writer, the supervisor, goes away. The zygote does
    this for a new child right after fork(), before it lets the child run
    anything, so the child itself pays nothing for it."""
    fcntl.fcntl(fd, fcntl.F_SETOWN, pid)


def lifeline_cut(fd: int) -> bool:
    """True if the supervisor is already gone. A hang-up that happened
    before the lifeline was armed raised no signal, so check once after."""
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False


def native_threads(pid: int | str = "self") -> dict[int, str]:
    """Map native thread id -> kernel thread name (`comm`) for a process."""
    threads: dict[int, str] = {}
    base = f"/proc/{pid}/task"
    for entry in os.listdir(base):
        try:
            with open(f"{base}/{entry}/comm", "rb") as comm:
                threads[int(entry)] = comm.read().decode(errors="replace").strip()
        # The thread ended while we looked: its directory is gone (ENOENT),
        # or still there but no longer readable (ESRCH).
        except (FileNotFoundError, ProcessLookupError):
            continue
    return threads


def child_pids(pid: int | str = "self") -> set[int]:
    """Pids of a process's children (re-parented orphans included); none if
    it is gone."""
    pids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return pids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                pids.update(int(pid) for pid in children.read().split())
        except (FileNotFoundError, ProcessLookupError):  # the thread ended while we looked
            continue
    return pids


def kill_child(pid: int) -> None:
    """SIGKILL a child of ours. Its pid cannot have been reused: an unreaped
    child keeps it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def open_fd_count(pid: int | str = "self") -> int:
    """Number of open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def wait_status_parts(status: int) -> tuple[int | None, int | None, bool]:
    """(exit_code, signal, core_dumped) of a wait status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), os.WCOREDUMP(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None, False
    return None, None, False


def describe_wait_status(status: int) -> str:
    """A wait status in words: 'exited with code 3', 'killed by SIGSEGV (core dumped)'."""
    code, sig, core = wait_status_parts(status)
    if sig is not None:
        return f"killed by {signal_name(sig)}" + (" (core dumped)" if core else "")
    if code is not None:
        return "exited normally" if code == 0 else f"exited with code {code}"
    return f"ended with wait status {status:#x}"


def helper_threads(pid: int | None) -> list[str]:
    """The names of a helper process's threads but its main one (the
    receiver); a thread a background function starts inherits its name."""
    if pid is None:
        return []
    try:
        threads = native_threads(pid)
    except OSError:  # gone since
        return []
    return sorted({name for tid, name in threads.items() if tid != pid})


class Memory(NamedTuple):
    """A process's memory in bytes. RSS counts every resident page it maps;
    PSS divides each shared page among the processes that share it (so the
    PSS of a zygote and its workers add up to what they really use); USS is
    what is its own alone (Private_Clean + Private_Dirty): freed if it ends."""

    rss: int
    pss: int
    uss: int


def memory_usage(pid: int | str = "self") -> Memory | None:
    """A process's RSS, PSS and USS from /proc/PID/smaps_rollup; None if it
    is gone (or a zombie, which has no memory left).

    The kernel walks the process's page tables to answer: measured here,
    0.3-0.8 ms for a 200 MB numpy array (huge pages), 15-19 ms (up to 50)
    for a 280 MB heap of small Python objects, in the process or a fork of it.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            text = rollup.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    kib: dict[bytes, int] = {}
    for line in text.splitlines()[1:]:  # the first line names the range rolled up
        name, _, rest = line.partition(b":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            kib[name] = int(fields[0])
    if b"Rss" not in kib:
        return None
    uss = kib.get(b"Private_Clean", 0) + kib.get(b"Private_Dirty", 0)
    return Memory(kib[b"Rss"] * 1024, kib.get(b"Pss", 0) * 1024, uss * 1024)
