"""The zygote: a preloaded, single-threaded process that forks workers.

Started by the supervisor as a fresh interpreter (never forked from it),
with two inherited descriptors: its control socket to the supervisor and the
read end of the supervisor's lifeline pipe. It imports the preload modules,
freezes the heap, and then only forks on request and reaps its children.
It never opens a ZeroMQ socket: libzmq's I/O threads would make every fork
a fork of a multi-threaded process.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import select
import signal
import socket
import sys
import traceback
from typing import NoReturn

from . import worker
from .linux import arm_lifeline, open_lifeline, set_parent_death_signal
from .protocol import (
    Boot,
    Booted,
    BootFailed,
    Fork,
    Forked,
    ForkFailed,
    Reaped,
    decode_control,
    encode,
)

log = logging.getLogger("zygote.zygote")

# Fork requests carry at most a small task (the supervisor sends bigger ones
# down the worker's channel), so control messages stay far below this.
_CONTROL_BUFFER = 1 << 17


class Zygote:
    """Serves fork requests from the supervisor until its control socket closes.

    It installs no signal handler: children are reaped through pidfds in
    the same poll() as the control socket, so a new child inherits no
    handler and no wakeup fd that it would have to undo.
    """

    def __init__(self, control: socket.socket, lifeline_fd: int, boot: Boot) -> None:
        self.control = control
        self.lifeline_fd = lifeline_fd
        self.boot = boot
        self.steps = worker.Step.registered()
        self._buffer = bytearray(_CONTROL_BUFFER)
        self._poller = select.poll()
        self._children: dict[int, int] = {}  # pidfd -> pid, until reaped
        self._kit = self._make_kit()

    def _make_kit(self) -> tuple[int, int, int]:
        """The next child's channel (our end, its end) and lifeline, made
        before they are needed so that neither the fork request nor the
        child pays for them."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return ours.detach(), theirs.detach(), open_lifeline(self.lifeline_fd)

    def serve(self) -> None:
        control_fd = self.control.fileno()
        self._poller.register(control_fd, select.POLLIN)
        while True:
            for fd, _ in self._poller.poll():
                if fd != control_fd:
                    self._reap(fd)
                    continue
                size = self.control.recv_into(self._buffer)
                if not size:
                    log.debug("control socket closed; generation %d retires", self.boot.generation)
                    return
                msg = decode_control(bytes(memoryview(self._buffer)[:size]))
                if isinstance(msg, Fork):
                    self.fork(msg)
                else:
                    log.warning("unexpected %s message from the supervisor", msg.KIND)

    def fork(self, request: Fork) -> None:
        task = None
        if request.task is not None and request.payload is not None:
            task = worker.PreparedTask(
                request.handle, request.task, request.payload, request.env, request.cwd
            )
            task.prepare(import_modules=False)
        ours, theirs, lifeline = self._kit
        setup = worker.ChildSetup(
            channel=theirs,
            lifeline=lifeline,
            close=(self.control.fileno(), ours),
            steps=self.steps,
            task=task,
            max_result_bytes=self.boot.max_result_bytes,
        )
        try:
            pid = os.fork()
        except OSError as exc:
            self._send(ForkFailed(request.handle, f"fork() failed: {exc}"))
            return
        if pid == 0:
            code = 70
            try:
                code = worker.run(setup)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        # From here on the child may run its task as soon as it is told to:
        # arm its lifeline first, so that it never outlives the supervisor.
        arm_lifeline(lifeline, pid)
        pidfd = os.pidfd_open(pid)
        self._children[pidfd] = pid
        self._poller.register(pidfd, select.POLLIN)
        try:
            socket.send_fds(self.control, [encode(Forked(request.handle, pid))], [ours, pidfd])
            if task is not None:
                # Only now does the supervisor own the channel, so only now
                # may the task run: had we died before this point, the child
                # would see its channel close and exit without running it.
                os.write(ours, worker.GO_FRAME)
        finally:
            for fd in (ours, theirs, lifeline):
                os.close(fd)
            self._kit = self._make_kit()

    def _reap(self, pidfd: int) -> None:
        pid = self._children.pop(pidfd)
        self._poller.unregister(pidfd)
        os.close(pidfd)
        try:
            _, status, usage = os.wait4(pid, 0)
        except ChildProcessError:  # not ours to reap (cannot happen; be safe)
            return
        self._send(Reaped(pid, status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss))

    def _send(self, msg: Reaped | ForkFailed) -> None:
        self.control.sendall(encode(msg))


def preload(boot: Boot) -> None:
    """Import the preload modules the way `python -m` would find them."""
    if boot.cwd not in sys.path:
        sys.path.insert(0, boot.cwd)
    for name in boot.preload:
        importlib.import_module(name)


def main(control_fd: int, lifeline_fd: int, supervisor_pid: int) -> NoReturn:
    """Entry point of a zygote process (exec'd by the supervisor)."""
    # If the supervisor dies, so do we; and if it died before we got here,
    # the kernel's parent-death signal would never come, so check.
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        os._exit(1)
    control = socket.socket(fileno=control_fd)
    boot = decode_control(control.recv(_CONTROL_BUFFER))
    if not isinstance(boot, Boot):
        raise SystemExit(f"zygote: expected a boot message, got {boot.KIND}")
    logging.basicConfig(
        level=boot.log_level,
        format="%(asctime)s %(levelname)-7s zygote[%(process)d] %(name)s: %(message)s",
    )
    try:
        preload(boot)
    except BaseException:
        control.sendall(encode(BootFailed(traceback.format_exc())))
        os._exit(1)
    # Move everything preloaded into the permanent generation: a collection
    # in a child would otherwise touch (and so copy) every object's header.
    gc.collect()
    gc.freeze()
    server = Zygote(control, lifeline_fd, boot)
    control.sendall(encode(Booted(os.getpid(), boot.generation)))
    try:
        server.serve()
    finally:
        # A retiring zygote leaves its workers alone: they belong to the
        # supervisor's subreaper once we are gone.
        os._exit(0)
