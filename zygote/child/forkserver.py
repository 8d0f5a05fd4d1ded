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
from collections.abc import Callable
from typing import NoReturn

from .. import hooks
from ..codec import GO_FRAME, decode_control, encode
from ..config import setup_logging
from ..linux import (
    arm_lifeline,
    native_threads,
    open_lifeline,
    set_parent_death_signal,
    set_process_title,
)
from ..protocol import (
    DEFAULT_PROFILE,
    Boot,
    Booted,
    BootFailed,
    Control,
    Fork,
    Forked,
    ForkFailed,
    ProtocolError,
    Reaped,
    Threads,
)
from . import capture, gate, guards, helper, inventory, outbox, worker
from .inventory import ThreadInfo
from .steps import StartupSteps

log = logging.getLogger("zygote.zygote")

# The supervisor keeps fork requests under CARRY_LIMIT (64 KiB: a bigger task
# goes down the worker's channel instead), far below this.
_CONTROL_BUFFER = 1 << 17


class ForkServer:
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
        self._report = inventory.Report()
        self._natives: set[int] = set()  # native thread ids the last inventory saw
        self._overflow_logged = False
        self._missed: list[str] = []
        self._missed_logged = 0.0
        self._kit = self._make_kit()
        self.helper = None
        if outbox.REGISTRY:
            self.helper = helper.Keeper(
                lifeline_fd, self._poller, fork=self._fork_helper, send=self._send
            )

    @property
    def _private(self) -> tuple[int, ...]:
        """The zygote's own descriptors besides the control socket and kit."""
        return self.helper.fds() if self.helper is not None else ()

    def _make_kit(self) -> tuple[int, ...]:
        """The next child's channel (our end, its end), lifeline and output
        pipes (capture.pipes), made before they are needed so that neither
        the fork request nor the child pays for them."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return ours.detach(), theirs.detach(), open_lifeline(self.lifeline_fd), *capture.pipes()

    def serve(self) -> None:
        control_fd = self.control.fileno()
        self._poller.register(control_fd, select.POLLIN)
        self.inventory()
        if self.helper is not None:
            self.helper.start()
        while True:
            for fd, _ in self._poller.poll(self.helper.due_in() if self.helper else None):
                if self.helper is not None and fd == self.helper.pidfd:
                    self.helper.exited()
                elif fd != control_fd:
                    self._reap(fd)
                elif not self._on_control():
                    log.debug("control socket closed; generation %d retires", self.boot.generation)
                    return
            if self.helper is not None and self.helper.due_in() == 0:
                self.helper.start()

    def _on_control(self) -> bool:
        """Handle one control message; False once the supervisor closed."""
        size, _, flags, _ = self.control.recvmsg_into([self._buffer])
        if not size:
            return False
        # A bad request is the supervisor's bug, not a reason to die:
        # its fork deadline will notice the missing answer.
        if flags & socket.MSG_TRUNC:
            log.error("dropped a control message over %d bytes", _CONTROL_BUFFER)
            return True
        try:
            msg = decode_control(bytes(memoryview(self._buffer)[:size]))
        except ProtocolError as exc:
            log.error("dropped a control message: %s", exc)
            return True
        if isinstance(msg, Fork):
            self.fork(msg)
        else:
            log.warning("unexpected %s message from the supervisor", msg.KIND)
        return True

    def inventory(self) -> tuple[list[ThreadInfo], list[ThreadInfo]]:
        """The threads besides ours: all of them (what the guards are for),
        and those to report (what warnings and the thread policy are for).

        A native thread is reported once a second inventory sees it too: a
        Python thread that is starting or ending while we look shows in /proc
        only, for microseconds, and is not a native thread to warn about.
        Each kind of thread is warned about once; the supervisor hears
        whenever the report changes."""
        try:
            threads = inventory.take(self.boot.allow_threads)
        except Exception as exc:
            # Never die of our own inventory; not knowing means guarding.
            log.exception("thread inventory failed; forking as if threads were running")
            return [inventory.unknown(exc)], []
        natives = {t.native_id for t in threads if t.kind == "native"}
        reported = [t for t in threads if t.kind == "python" or t.native_id in self._natives]
        self._natives = natives
        new, changed = self._report.update(reported)
        for thread in new:
            if thread.allowed:
                log.info("%s (allowed)", thread.describe())
            else:
                log.warning(
                    "%s is running in the zygote: a child inherits, held, every lock it "
                    "holds at the fork. %s",
                    thread.describe(),
                    thread.advice(),
                )
        if self._report.overflowed and not self._overflow_logged:
            self._overflow_logged = True
            log.warning(
                "more than %d kinds of threads: new kinds are no longer listed",
                inventory.Report.LIMIT,
            )
        if changed:
            self._send(Threads(self._report.entries()))
        return threads, reported

    def fork(self, request: Fork) -> None:
        task = None
        if request.task is not None and request.payload is not None:
            task = worker.PreparedTask(
                request.handle,
                request.task,
                request.payload,
                request.env,
                request.cwd,
                candidate=request.candidate,
                limits=request.limits,
            )
            task.prepare(import_modules=False)
        threads, reported = self.inventory()
        warnings = list(dict.fromkeys(t.describe() for t in reported if not t.allowed))
        if warnings and self.boot.thread_policy == "refuse":
            listing = "; ".join(warnings)
            error = f"refused to fork (--thread-policy refuse), threads are running: {listing}"
            self._send(ForkFailed(request.handle, error, refused=True))
            return
        ours, theirs, lifeline, out_r, out_w, err_r, err_w = self._kit
        setup = worker.ChildSetup(
            channel=theirs,
            lifeline=lifeline,
            # Everything of the zygote's the child must not keep: the control
            # socket, its channel's and pipes' other ends, a pidfd per sibling,
            # and the helper's (its pidfd, its end of the background channel).
            close=(
                self.control.fileno(),
                ours,
                out_r,
                err_r,
                self.lifeline_fd,
                *self._children,
                *self._private,
            ),
            stdio=(out_w, err_w),
            steps=self.steps.threaded() if threads else self.steps.alone,
            task=task,
            max_result_bytes=self.boot.max_result_bytes,
            exit_timeout=self.boot.exit_timeout,
            allow_tasks=self.boot.allow_tasks,
            promote=promote,
            title=worker.title(task.task if task is not None else None),
        )
        try:
            pid, held = self._fork(threads, lambda: worker.run(setup))
        except OSError as exc:
            self._send(ForkFailed(request.handle, f"fork() failed: {exc}"))
            return
        # From here on the child may run its task as soon as it is told to:
        # arm its lifeline first, so that it never outlives the supervisor.
        arm_lifeline(lifeline, pid)
        pidfd = os.pidfd_open(pid)
        self._children[pidfd] = pid
        self._poller.register(pidfd, select.POLLIN)
        try:
            forked = Forked(request.handle, pid, warnings, held.waited, held.missed)
            socket.send_fds(self.control, [encode(forked)], [ours, pidfd, out_r, err_r])
            if task is not None and request.go:
                # Only now does the supervisor own the channel, so only now
                # may the task run: had we died before this point, the child
                # would see its channel close and exit without running it.
                # (With cgroups the supervisor says it, once the child is in
                # its cgroup: `request.go` is False.)
                os.write(ours, GO_FRAME)
        finally:
            for fd in self._kit:
                os.close(fd)
            self._kit = self._make_kit()

    def _fork(self, threads: list[ThreadInfo], child: Callable[[], int]) -> tuple[int, guards.Held]:
        """fork(), under the guards when other threads run; the child runs
        `child()` and exits with its code. Returns the pid and what the fork
        held (for the stats); raises OSError if fork() fails."""
        # With no other thread, nothing can be held: no guard to take.
        held = guards.NOTHING
        guarded = bool(threads) and self.boot.fork_guards
        if guarded:
            held = guards.hold(self.boot.fork_guard_timeout, hooks.FORK_LOCKS)
        try:
            pid = _fork(quiet=bool(threads))
        except OSError:
            held.release()
            raise
        if pid == 0:
            code = 70
            try:
                _in_child(held, repair=guarded)
                code = child()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        held.release()
        if held.missed:  # logged only now: logging may need what was held
            self._warn_missed(held)
        return pid, held

    def _fork_helper(self, child: Callable[[], int]) -> int:
        """Fork the helper process (see `helper.Keeper`), under the guards;
        it keeps none of the zygote's descriptors but its own."""
        close = (self.control.fileno(), self.lifeline_fd, *self._kit, *self._children)

        def helper_main() -> int:
            for fd in close:
                os.close(fd)
            set_process_title(_title("helper", self.boot))
            return child()

        return self._fork(self.inventory()[0], helper_main)[0]

    def _warn_missed(self, held: guards.Held) -> None:
        """Say what a fork went ahead without: once per change, or a minute."""
        now = time.monotonic()
        if held.missed == self._missed and now - self._missed_logged < 60:
            return
        self._missed, self._missed_logged = held.missed, now
        log.warning(
            "a fork went ahead without %s, after waiting %.1fs (--fork-guard-timeout %gs); "
            "the child's validators are the remaining check",
            "; ".join(held.missed),
            held.waited,
            self.boot.fork_guard_timeout,
        )

    def _reap(self, pidfd: int) -> None:
        pid = self._children.pop(pidfd)
        self._poller.unregister(pidfd)
        os.close(pidfd)
        try:
            _, status, usage = os.wait4(pid, 0)
        except ChildProcessError:  # not ours to reap (cannot happen; be safe)
            return
        self._send(Reaped(pid, status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss))

    def _send(self, msg: Control, fds: tuple[int, ...] = ()) -> None:
        if fds:
            socket.send_fds(self.control, [encode(msg)], list(fds))
        else:
            self.control.sendall(encode(msg))


def _in_child(held: guards.Held, *, repair: bool) -> None:
    """First thing in a new child: re-create what the fork held, replace the
    streams whose buffer lock a vanished thread may hold, and turn off what
    only a zygote needs (the gate, recording thread starts)."""
    held.reset_in_child()
    gate.GATE.active = False
    inventory.stop_recording()
    if repair:
        guards.repair_streams()


def _title(role: str, boot: Boot) -> str:
    """ "zygote: zygote gen 3", "zygote: helper gen 2 [heavy]" (ps, top)."""
    profile = "" if boot.profile == DEFAULT_PROFILE else f" [{boot.profile}]"
    return f"zygote: {role} gen {boot.generation}{profile}"


def _fork(*, quiet: bool) -> int:
    if not quiet:
        return os.fork()
    # Python 3.12+ warns that forking with threads may deadlock; the thread
    # inventory has already said so, with names.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def preload(boot: Boot) -> None:
    """Import the preload modules the way `python -m` would find them."""
    # Relative entries (PYTHONPATH=.) would follow each job's _cwd: anchor
    # them to the server's directory, once, so no job can plant modules.
    sys.path[:] = [os.path.join(boot.cwd, entry) if entry else boot.cwd for entry in sys.path]
    if boot.cwd not in sys.path:
        sys.path.insert(0, boot.cwd)
    for name in boot.preload:
        before = set(native_threads())
        inventory.importing = name
        try:
            importlib.import_module(name)
        finally:
            inventory.importing = ""
        inventory.note_origins(name, before)


def promote(control_fd: int, lifeline_fd: int) -> int:
    """In a worker whose task succeeded: become the next zygote generation
    (a refork). Its lazy imports, caches and warmed-up state are what its
    children inherit. Returns the exit code once the generation retires."""
    control = socket.socket(fileno=control_fd)
    boot = decode_control(control.recv(_CONTROL_BUFFER))
    if not isinstance(boot, Boot):
        log.error("refork candidate: expected a boot message, got %s", boot.KIND)
        return 1
    try:
        _check_candidate(boot)
        server = ForkServer(control, lifeline_fd, boot)
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, NotACandidate) else traceback.format_exc()
        control.sendall(encode(BootFailed(reason)))
        return 1
    # As after a preload: what the tasks left is frozen, not copied by a
    # collection in every child.
    gc.collect()
    gc.freeze()
    set_process_title(_title("zygote", boot))
    control.sendall(encode(Booted(os.getpid(), boot.generation)))
    log.info("generation %d: promoted from a worker (pid %d)", boot.generation, os.getpid())
    return _serve(server, boot)


class NotACandidate(Exception):
    """Why a worker cannot become a zygote (said to the supervisor as is)."""


def _check_candidate(boot: Boot) -> None:
    """Raise NotACandidate unless this worker is fit to be forked from."""
    if hooks.NOT_FORK_SAFE:
        raise NotACandidate(f"the task said so: {hooks.NOT_FORK_SAFE[0]}")
    for hook in hooks.BEFORE_REFORK:
        try:
            hook()
        except Exception as exc:
            raise NotACandidate(f"before_refork hook {hooks._name(hook)} failed: {exc!r}") from exc
    left = [t for t in inventory.take(boot.allow_threads) if not t.allowed]
    if left:
        names = "; ".join(dict.fromkeys(t.describe() for t in left))
        raise NotACandidate(f"a thread was left behind: {names}")
    # What a zygote does that a worker had stopped doing.
    gate.GATE.active = boot.fork_guards
    inventory.resume_recording()


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
    # Before any thread exists: the first title touches the environment.
    set_process_title(_title("zygote", boot))
    setup_logging(boot.log_level, boot.log_file, boot.log_format).propagate = False
    capture.line_buffered_stdout()
    # A child that crashes, or is killed with SIGABRT because it hung,
    # prints its Python stack to the server's log.
    faulthandler.enable(all_threads=True)
    # Before any preload module runs, so that what it binds is wrapped.
    if boot.fork_guards:
        gate.install()
    inventory.record_thread_starts(defer=boot.thread_policy == "defer")
    try:
        preload(boot)
        inventory.stop_deferring()
        if inventory.DEFERRED:
            names = ", ".join(repr(thread.name) for thread in inventory.DEFERRED)
            log.info("deferred to each worker: the start of threads %s", names)
        server = ForkServer(control, lifeline_fd, boot)
    except BaseException:
        control.sendall(encode(BootFailed(traceback.format_exc())))
        os._exit(1)
    # Move everything preloaded into the permanent generation: a collection
    # in a child would otherwise touch (and so copy) every object's header.
    gc.collect()
    gc.freeze()
    control.sendall(encode(Booted(os.getpid(), boot.generation)))
    os._exit(_serve(server, boot))


def _serve(server: ForkServer, boot: Boot) -> int:
    code = 0
    try:
        server.serve()
    except BaseException:
        log.critical("zygote generation %d died of an error", boot.generation, exc_info=True)
        code = 1
    finally:
        if server.helper is not None:
            server.helper.stop()
    # A retiring zygote leaves its workers alone: they belong to the
    # supervisor's subreaper once we are gone.
    return code
