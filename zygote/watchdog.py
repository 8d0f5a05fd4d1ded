"""The cgroup watchdog: kills a server's cgroup once its supervisor is gone.

Run as a script (``python -I -S watchdog.py FD PATH``), not imported: it
needs nothing but the standard library, starts in about 20 ms, and holds
nothing of the supervisor's. The supervisor keeps the only write end of
the pipe whose read end is FD; when the supervisor exits — normally, or
killed with SIGKILL, when nothing of its own can run — the pipe hangs up,
and the watchdog writes `cgroup.kill` of PATH (the server's cgroup: every
zygote, worker and whatever their tasks started, daemons included), waits
for it to empty and removes it. It lives in the supervisor's own cgroup,
outside the one it kills.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time


def _kill_and_remove(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.isdir(path) and time.monotonic() < deadline:
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w") as kill:
            kill.write("1")
        for directory, _, _ in os.walk(path, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # EBUSY until the killed processes are gone
        if os.path.isdir(path):
            time.sleep(0.01)


def main(fd: int, path: str) -> int:
    # A terminal's ^C or hang-up is for the supervisor: it decides.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # name it in ps and /proc
        ctypes.CDLL(None).prctl(15, b"zygote-watchdog", 0, 0, 0)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        poller.poll()
        try:
            if not os.read(fd, 4096):
                break
        except BlockingIOError:
            continue
    _kill_and_remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
