"""The zygote: a preloaded, single-threaded process that forks workers.

Started by the supervisor as a fresh interpreter (never forked from it),
with two inherited descriptors: its control socket to the supervisor and the
read end of the supervisor's lifeline pipe. It imports the preload modules,
freezes the heap, and then only forks on request and reaps its children.
It never opens a ZeroMQ socket: libzmq's I/O threads would make every fork
a fork of a multi-threaded process.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
import warnings
from typing import NoReturn

from . import hooks, inventory, validators, worker
from .codec import (
    decode_control,
    encode,
)
from .config import LOG_FORMAT
from .linux import arm_lifeline, native_threads, open_lifeline, set_parent_death_signal
from .protocol import (
    Boot,
    Booted,
    BootFailed,
    Fork,
    Forked,
    ForkFailed,
    ProtocolError,
    Reaped,
    Threads,
)

log = logging.getLogger("zygote.zygote")

# The supervisor keeps fork requests under CARRY_LIMIT (64 KiB: a bigger task
# goes down the worker's channel instead), far below this.
_CONTROL_BUFFER = 1 << 17


class Zygote:
    """Serves fork requests from the supervisor until its control socket closes.

    It installs no Python signal handler: children are reaped through pidfds in
    the same poll() as the control socket, so a new child inherits no
    handler and no wakeup fd that it would have to undo.
    """

    def __init__(self, control: socket.socket, lifeline_fd: int, boot: Boot) -> None:
        self.control = control
        self.lifeline_fd = lifeline_fd
        self.boot = boot
        self.steps = StartupSteps(boot)
        self._buffer = bytearray(_CONTROL_BUFFER)
        self._poller = select.poll()
        self._children: dict[int, int] = {}  # pidfd -> pid, until reaped
        self._threads_seen: frozenset[tuple[str, int, str]] = frozenset()
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
        self.inventory()
        while True:
            for fd, _ in self._poller.poll():
                if fd != control_fd:
                    self._reap(fd)
                    continue
                size, _, flags, _ = self.control.recvmsg_into([self._buffer])
                if not size:
                    log.debug("control socket closed; generation %d retires", self.boot.generation)
                    return
                # A bad request is the supervisor's bug, not a reason to die:
                # its fork deadline will notice the missing answer.
                if flags & socket.MSG_TRUNC:
                    log.error("dropped a control message over %d bytes", _CONTROL_BUFFER)
                    continue
                try:
                    msg = decode_control(bytes(memoryview(self._buffer)[:size]))
                except ProtocolError as exc:
                    log.error("dropped a control message: %s", exc)
                    continue
                if isinstance(msg, Fork):
                    self.fork(msg)
                else:
                    log.warning("unexpected %s message from the supervisor", msg.KIND)

    def inventory(self) -> list[inventory.ThreadInfo]:
        """The threads besides ours; logs and reports the set when it changes."""
        threads = inventory.take(self.boot.allow_threads)
        seen = inventory.signature(threads)
        if seen != self._threads_seen:
            for thread in threads:
                if (thread.kind, thread.native_id, thread.name) in self._threads_seen:
                    continue
                if thread.allowed:
                    log.info("%s (allowed)", thread.describe())
                else:
                    log.warning("%s: a child can deadlock on any lock it held", thread.describe())
            self._threads_seen = seen
            self._send(Threads([thread.as_dict() for thread in threads]))
        return threads

    def fork(self, request: Fork) -> None:
        task = None
        if request.task is not None and request.payload is not None:
            task = worker.PreparedTask(
                request.handle, request.task, request.payload, request.env, request.cwd
            )
            task.prepare(import_modules=False)
        threads = self.inventory()
        warnings = [t.describe() for t in threads if not t.allowed]
        if warnings and self.boot.thread_policy == "refuse":
            listing = "; ".join(warnings)
            self._send(ForkFailed(request.handle, f"refused to fork: {listing}", refused=True))
            return
        ours, theirs, lifeline = self._kit
        setup = worker.ChildSetup(
            channel=theirs,
            lifeline=lifeline,
            # Everything of the zygote's the child must not keep: the control
            # socket, its channel's other end, and a pidfd per sibling.
            close=(self.control.fileno(), ours, self.lifeline_fd, *self._children),
            steps=self.steps.threaded() if threads else self.steps.alone,
            task=task,
            max_result_bytes=self.boot.max_result_bytes,
        )
        held = self._hold_forks(bool(threads))
        try:
            pid = _fork(quiet=bool(threads))
        except OSError as exc:
            self._release_forks(held)
            self._send(ForkFailed(request.handle, f"fork() failed: {exc}"))
            return
        self._release_forks(held)
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
            forked = Forked(request.handle, pid, warnings)
            socket.send_fds(self.control, [encode(forked)], [ours, pidfd])
            if task is not None:
                # Only now does the supervisor own the channel, so only now
                # may the task run: had we died before this point, the child
                # would see its channel close and exit without running it.
                os.write(ours, worker.GO_FRAME)
        finally:
            for fd in (ours, theirs, lifeline):
                os.close(fd)
            self._kit = self._make_kit()

    def _hold_forks(self, threaded: bool) -> list[hooks._Lock]:
        """Take every registered fork lock and, with other threads about, wait
        for open prevent_fork() sections and keep new ones from opening.
        Returns what to release (in the parent and in the child alike).

        A thread may take a fork lock inside a section, or open a section
        while holding a fork lock; so nothing is waited for while something
        else is held: on a miss everything is let go and tried again shortly.
        """
        gate = hooks.GATE if threaded else None
        locks = list(hooks.FORK_LOCKS)
        if gate is None and not locks:
            return []
        started = warned = time.monotonic()
        while True:
            if gate is not None:
                gate.condition.acquire()  # held by threads only for a moment
                if gate.sections:
                    gate.condition.wait(0.05)  # lets go while it waits
                    holders = [(name, since) for name, since, _ in gate.sections.values()]
                    gate.condition.release()
                    warned = self._warn_held(started, warned, holders)
                    continue
            taken = []
            for lock in locks:
                if not lock.acquire(blocking=False):
                    break
                taken.append(lock)
            if len(taken) == len(locks):
                return ([gate.condition] if gate is not None else []) + taken
            for lock in reversed(taken):
                lock.release()
            if gate is not None:
                gate.condition.release()
            warned = self._warn_held(started, warned, [])
            time.sleep(0.001)

    def _warn_held(self, started: float, warned: float, holders: list[tuple[str, float]]) -> float:
        """Log, every prevent-fork-warning seconds, why a fork is waiting."""
        now = time.monotonic()
        if now - warned < self.boot.prevent_fork_warning:
            return warned
        if holders:
            why = "prevent_fork() in " + ", ".join(
                f"{name!r} (for {now - since:.1f}s)" for name, since in holders
            )
        else:
            why = "a lock registered with zygote.fork_lock() is held"
        log.warning("a fork has waited %.1fs for %s", now - started, why)
        return now

    @staticmethod
    def _release_forks(held: list[hooks._Lock]) -> None:
        for lock in reversed(held):
            lock.release()

    def _reap(self, pidfd: int) -> None:
        pid = self._children.pop(pidfd)
        self._poller.unregister(pidfd)
        os.close(pidfd)
        try:
            _, status, usage = os.wait4(pid, 0)
        except ChildProcessError:  # not ours to reap (cannot happen; be safe)
            return
        self._send(Reaped(pid, status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss))

    def _send(self, msg: Reaped | ForkFailed | Threads) -> None:
        self.control.sendall(encode(msg))


def _fork(*, quiet: bool) -> int:
    if not quiet:
        return os.fork()
    # Python 3.12+ warns that forking with threads may deadlock; the thread
    # inventory has already said so, with names.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


class StartupSteps:
    """What a new child runs before it reports ready: the after-fork hooks,
    then the validators — the built-in probes only when the zygote has other
    threads (without them nothing can have been left locked)."""

    def __init__(self, boot: Boot) -> None:
        disabled = set(boot.disable_validators)
        user = dict(hooks.VALIDATORS)
        for name in boot.validators:
            user[name] = worker.resolve(name)
        self._hooks = [(f"after_fork:{hooks._name(f)}", f) for f in hooks.AFTER_FORK]
        self._user = [(name, f) for name, f in user.items() if name not in disabled]
        self._probes = {n: p for n, p in validators.builtin().items() if n not in disabled}
        self.alone = worker.Step.of(self._hooks + self._user)
        self._threaded: list[worker.Step] | None = None

    def threaded(self) -> list[worker.Step]:
        """The steps with the built-in probes. Probes with lazy set-up run once
        here first (at the first fork with threads, so that a thread-free
        zygote never loads what they need), so that it happens before the fork
        and not in every child; one that fails even here (no "localhost" to
        resolve, say) would fail every child, so it is dropped with a warning."""
        if self._threaded is None:
            for name in validators.WARM_UP & self._probes.keys():
                try:
                    self._probes[name]()
                except Exception as exc:
                    log.warning(
                        "built-in validator %r fails in the zygote itself (%s); not using it",
                        name,
                        exc,
                    )
                    del self._probes[name]
            self._threaded = worker.Step.of(self._hooks + list(self._probes.items()) + self._user)
        return self._threaded


def preload(boot: Boot) -> None:
    """Import the preload modules the way `python -m` would find them."""
    if boot.cwd not in sys.path:
        sys.path.insert(0, boot.cwd)
    for name in boot.preload:
        before = set(native_threads())
        importlib.import_module(name)
        inventory.note_origins(name, before)


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
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("zygote")
    logger.addHandler(handler)
    logger.setLevel(boot.log_level)
    logger.propagate = False
    # A child that crashes, or is killed with SIGABRT because it hung,
    # prints its Python stack to the server's log.
    faulthandler.enable(all_threads=True)
    hooks.GATE = hooks.ForkGate()
    try:
        preload(boot)
        server = Zygote(control, lifeline_fd, boot)
    except BaseException:
        control.sendall(encode(BootFailed(traceback.format_exc())))
        os._exit(1)
    # Move everything preloaded into the permanent generation: a collection
    # in a child would otherwise touch (and so copy) every object's header.
    gc.collect()
    gc.freeze()
    control.sendall(encode(Booted(os.getpid(), boot.generation)))
    try:
        server.serve()
    finally:
        # A retiring zygote leaves its workers alone: they belong to the
        # supervisor's subreaper once we are gone.
        os._exit(0)
