"""The worker: what runs in a freshly forked child of the zygote.

Everything here runs after fork(), in a copy of a process that may have had
other threads. Keep it short, touch little memory (every first write to an
inherited page costs a page copy), and always leave through os._exit() so
that no inherited at-exit handler (OpenSSL's is a known deadlock site) runs.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .. import hooks
from ..cgroups import apply_rlimits, describe_limit
from ..codec import (
    GO_FRAME,
    FrameDecoder,
    decode_channel,
    encode,
    frame,
    ok_result_prefix,
    unsendable,
)
from ..linux import lifeline_cut, set_process_title
from ..protocol import (
    EXITED,
    LOST,
    RAISED,
    Go,
    Phase,
    Promote,
    Ready,
    Result,
    Task,
    ValidatorFailed,
    task_allowed,
)
from . import capture
from .outbox import OUTBOX

log = logging.getLogger("zygote.worker")

READY_FRAME = frame(encode(Ready()))
GO = object()  # the order to run the task that came with the fork


def _idle() -> None:
    """What a pool child runs to warm up its task path."""


_WARM_UP = frame(encode(Task("warm-up", "zygote.child.worker:_idle", msgpack.packb([[], {}]))))

# Exit code of a child whose handover never completed (its zygote died
# before the supervisor got the channel): it ran nothing.
EXIT_ORPHANED = 0


@dataclass
class PreparedTask:
    """A task made ready before the fork, so the child inherits it decoded.

    Whatever could not be prepared in the zygote (a module it has not
    imported, arguments that do not decode) stays None and is redone in the
    child, where a failure becomes the task's error.
    """

    handle: str
    task: str
    payload: bytes
    env: dict[str, str] | None = None
    cwd: str | None = None
    func: Callable[..., Any] | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    ok_prefix: bytes = b""
    candidate: bool = False  # may become a zygote after it: wait to hear
    limits: dict[str, float] | None = None  # rlimits to set before it runs

    @classmethod
    def from_message(cls, msg: Task) -> PreparedTask:
        return cls(
            msg.handle,
            msg.task,
            msg.payload,
            msg.env,
            msg.cwd,
            candidate=msg.candidate,
            limits=msg.limits,
        )

    def prepare(self, *, import_modules: bool) -> None:
        """Resolve the function and decode the arguments, if possible.

        In the zygote (`import_modules=False`) the name is only looked up in
        what is already there, without running any code of the application's
        (an import, a module `__getattr__`): a client's request must not
        change the zygote. The child does the rest, or reports the error.
        """
        if not self.ok_prefix:
            self.ok_prefix = ok_result_prefix(self.handle)
        if self.func is None:
            if import_modules:
                self.func = resolve(self.task)
            else:
                self.func = _lookup_static(self.task)
        if self.args is None:
            try:
                self.args, self.kwargs = decode_arguments(self.payload)
            except Exception:
                if import_modules:
                    raise


@dataclass
class ChildSetup:
    """Everything a new child needs, built by the zygote before the fork so
    that the child finds it ready in memory it shares with the zygote."""

    channel: int  # the worker's end of its channel to the supervisor
    lifeline: int  # its own description of the lifeline pipe
    close: tuple[int, ...]  # the zygote's descriptors, closed in the child
    steps: list[Step]  # after-fork hooks and validators, in order
    task: PreparedTask | None = None
    max_result_bytes: int = 1 << 30
    exit_timeout: float = 2.0  # for the before_exit hooks, all together
    allow_tasks: list[str] | None = None  # fnmatch patterns; None: any task
    #: become a zygote: (control fd, lifeline fd) -> exit code (forkserver.promote)
    promote: Callable[[int, int], int] | None = None
    title: str = "zygote: worker"  # its process title until it has a task
    #: the write ends of its stdout and stderr pipes (capture.py)
    stdio: tuple[int, int] | None = None


def title(task: str | None) -> str:
    """A worker's process title: "zygote: worker pkg.mod:func" (ps, top)."""
    return f"zygote: worker {task}" if task else "zygote: worker (idle)"


@dataclass(frozen=True)
class Step:
    """One start-up step of a new worker: an after-fork hook or a validator."""

    name: str
    check: Callable[[], object]
    phase_frame: bytes  # the Phase message announcing it, pre-encoded

    @classmethod
    def of(cls, steps: list[tuple[str, Callable[[], object]]]) -> list[Step]:
        return [cls(name, check, frame(encode(Phase(name)))) for name, check in steps]


def resolve(task: str) -> Callable[..., Any]:
    """The callable named by "package.module:qualname". A name that is not
    there raises its usual error (ModuleNotFoundError, AttributeError),
    saying "task ... not found"; an error inside the module stays as it is."""
    module_name, _, qualname = task.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not exc.name or not f"{module_name}.".startswith(f"{exc.name}."):
            raise  # the module is there: something it imports is not
        raise ModuleNotFoundError(f"task {task} not found: {exc}", name=exc.name) from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise AttributeError(f"task {task} not found: {exc}") from None
    if not callable(obj):
        raise TypeError(f"{task} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


def check_defined_where_allowed(task: str, func: Callable[..., Any], allow: list[str]) -> None:
    """The supervisor checked the name a client gave; this checks what it
    names. "mymod:run" may be subprocess.run imported into mymod, and
    "mymod:os.system" walks into another module: allowed names, foreign code."""
    # A callable instance has no __qualname__ of its own: its class stands for it.
    target = func if hasattr(func, "__qualname__") else type(func)
    real = f"{getattr(target, '__module__', None)}:{getattr(target, '__qualname__', None)}"
    if not task_allowed(real, allow):
        raise PermissionError(
            f"{task} is {real}, defined outside what this server allows to run "
            "(its --allow-task patterns, or on tcp its preloaded modules)"
        )


def _lookup_static(task: str) -> Callable[..., Any] | None:
    """The plain function named by `task` if it is already defined, found
    through the modules' and classes' own dictionaries only; else None."""
    module_name, _, qualname = task.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None:
            return None
        owners = obj.__mro__ if isinstance(obj, type) else (obj,)
        obj = next((vars(o)[part] for o in owners if part in getattr(o, "__dict__", {})), None)
    return obj if isinstance(obj, types.FunctionType | types.BuiltinFunctionType) else None


def decode_arguments(payload: bytes) -> tuple[list[Any], dict[str, Any]]:
    decoded = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or not isinstance(decoded[0], list)
        or not isinstance(decoded[1], dict)
        or not all(isinstance(k, str) for k in decoded[1])
    ):
        raise TypeError("task arguments must be encoded as [args list, kwargs map]")
    return decoded[0], decoded[1]


def type_name(exc_type: type[BaseException]) -> str:
    module = exc_type.__module__
    return exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"


def run(setup: ChildSetup) -> int:
    """The child's whole life; returns its exit code. Call in the child only.

    Every page this touches is copied from the zygote (about 2.3 us each
    here), so the path to the result is kept short: raw descriptors rather
    than socket objects, messages encoded before the fork, and the work that
    can wait (flushing stdio, dying) done after the result is sent.
    """
    for fd in setup.close:
        os.close(fd)
    if setup.stdio is not None:
        capture.redirect(*setup.stdio)
    # A process group of its own: without cgroups, what its task starts
    # (unless it leaves the group) is killed with it (server/cleanup.py).
    os.setpgid(0, 0)
    # A pool child's second title (its task's) then costs ~4 us on the task's
    # path, not ~30: this first one has copied the pages it writes.
    set_process_title(setup.title)
    channel = setup.channel
    for step in setup.steps:
        _write_all(channel, step.phase_frame)
        try:
            step.check()
        except BaseException as exc:
            error = _user_traceback(exc)  # from the hook's own frame on
            _write_all(channel, frame(encode(ValidatorFailed(step.name, error))))
            return 1
    if setup.task is None:
        # A pool child waits for its task: walk the task path once now, so
        # that the pages it touches are copied while nobody waits for them.
        _run_task(PreparedTask.from_message(decode_channel(_WARM_UP[4:])), 1 << 20)  # type: ignore[arg-type]
        capture.flush()  # as before a result: its pages are copied now too
    _write_all(channel, READY_FRAME)

    order = _receive_order(channel)
    # The zygote armed the lifeline before any order could be sent; if the
    # supervisor died before that, no signal came: look once.
    if order is None or lifeline_cut(setup.lifeline):
        return EXIT_ORPHANED
    task = setup.task if order is GO else PreparedTask.from_message(order)  # type: ignore[arg-type]
    if task is None:  # a Go without a task carried along: a supervisor bug
        raise RuntimeError("told to go without a task")
    if order is not GO:
        set_process_title(title(task.task))
    result, code = _run_task(task, setup.max_result_bytes, setup.allow_tasks)
    # Its output before its result: the supervisor reads the pipes dry when
    # the result comes, so nothing printed by the task arrives after it.
    capture.flush()
    _write_all(channel, frame(result))
    # The hooks, then what is left of background messages, share one budget.
    deadline = time.monotonic() + setup.exit_timeout
    if hooks.BEFORE_EXIT:
        run_before_exit(hooks.BEFORE_EXIT, setup.exit_timeout)
    OUTBOX.flush(deadline - time.monotonic())
    capture.flush()
    if task.candidate and setup.promote is not None:
        fds = _await_promotion(channel)
        if fds is not None:
            os.close(channel)
            capture.restore(fds[1:])  # the server's stdout and stderr, sent along
            return setup.promote(fds[0], setup.lifeline)
        return code
    # Dying means tearing down a copy of a big address space: about a
    # millisecond of kernel time that, on a small machine, delays the very
    # result we just sent (measured: +0.3 to +0.8 ms to the client). So drop
    # to the idle scheduling class, and leave only once the supervisor has
    # read the result and closed our channel.
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    with contextlib.suppress(OSError):
        while os.read(channel, 4096):
            pass
    return code


class ExitTimeout(BaseException):
    """The before_exit hooks ran out of time (raised by SIGALRM)."""


def run_before_exit(hooks_: list[Callable[[], object]], timeout: float) -> None:
    """Run the before_exit hooks, all within `timeout` seconds. A hook that
    raises is logged and the next one runs; one still running at the
    deadline is interrupted (a Python-level wait, a sleep, a socket call)
    and the rest are skipped. One stuck where a signal cannot reach it is
    killed by the supervisor once `--exit-timeout` and `--kill-grace` are up.
    """

    def expired(signum: int, frame: object) -> None:
        raise ExitTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    name = "?"
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            for hook in hooks_:
                name = hooks._name(hook)
                try:
                    hook()
                except ExitTimeout:
                    raise
                except BaseException:  # SystemExit too: the task's outcome stands
                    log.exception("before_exit hook %s failed", name)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except ExitTimeout:
        log.warning(
            "before_exit hook %s cut off: the hooks ran past --exit-timeout (%gs)", name, timeout
        )
    finally:
        signal.signal(signal.SIGALRM, previous)


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written < len(data):  # only big messages come out in pieces
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


def _await_promotion(fd: int) -> list[int] | None:
    """A refork candidate waits for the supervisor's word: a Promote with its
    control socket and the server's stdout and stderr (returned), or its
    channel closed (None: it just ends)."""
    sock = socket.socket(fileno=os.dup(fd))
    decoder = FrameDecoder(1 << 16)
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(sock, 4096, 3)
            if not data:
                for extra in fds:
                    os.close(extra)
                return None
            frames = decoder.feed(data)
            if fds and frames and isinstance(decode_channel(frames[0]), Promote):
                return fds
            for extra in fds:
                os.close(extra)
    except OSError:
        return None
    finally:
        sock.close()


def _receive_order(fd: int) -> Task | object | None:
    """Block for the one order this worker gets: GO (run the task that came
    with the fork) or a Task; None if the channel closed first."""
    data = os.read(fd, 4096)
    if data.startswith(GO_FRAME):
        return GO
    decoder = FrameDecoder()
    while data:
        frames = decoder.feed(data)
        if frames:
            msg = decode_channel(frames[0])
            if isinstance(msg, Go):
                return GO
            if not isinstance(msg, Task):
                raise RuntimeError(f"expected a task, got {msg.KIND}")
            return msg
        data = os.read(fd, 1 << 20)
    return None


def _run_task(
    task: PreparedTask, max_result_bytes: int, allow: list[str] | None = None
) -> tuple[bytes, int]:
    """Run it; the encoded Result and the exit code for the process."""
    code = 0
    try:
        if task.env:
            os.environ.update(task.env)
        if task.cwd:
            os.chdir(task.cwd)
        task.prepare(import_modules=True)
        assert task.func is not None and task.args is not None and task.kwargs is not None
        if allow is not None:
            check_defined_where_allowed(task.task, task.func, allow)
        if task.limits:
            apply_rlimits(task.limits)
        value = task.func(*task.args, **task.kwargs)
    except SystemExit as exc:
        code, message = _exit_code(exc)
        return encode(Result(task.handle, EXITED, exit_code=code, message=message)), code
    except BaseException as exc:
        limit = _limit_reached(exc, task.limits)
        if limit is not None:
            return _lost_to_limit(task, limit, exc), 1
        return _raised(task.handle, exc), code
    try:
        result = task.ok_prefix + msgpack.packb(msgpack.packb(value, use_bin_type=True))
    except Exception as exc:
        refused = TypeError(unsendable(f"the result of {task.task}", value, exc))
        return _raised(task.handle, refused, tb=False), code
    if len(result) > max_result_bytes:
        err = ValueError(
            f"the result of {task.task} is {len(result)} bytes, over the server's "
            f"limit of {max_result_bytes}; write big results to a file and return its path"
        )
        return _raised(task.handle, err, tb=False), code
    return result, code


def _limit_reached(exc: BaseException, limits: dict[str, float] | None) -> str | None:
    """The rlimit an exception escaping the task comes from, if it does: the
    kernel refused memory (RLIMIT_AS) or a descriptor (RLIMIT_NOFILE), and
    Python raised it in the task instead of the process dying."""
    if not limits:
        return None
    if isinstance(exc, MemoryError) and "memory" in limits:
        return "memory"
    if isinstance(exc, OSError) and exc.errno == errno.EMFILE and "nofile" in limits:
        return "nofile"
    return None


def _lost_to_limit(task: PreparedTask, limit: str, exc: BaseException) -> bytes:
    """The job ends as lost (WorkerLost, `.limit` set): the worker could not
    go on within its limit. The exception and its traceback are kept."""
    assert task.limits is not None
    rlimit = {"memory": "RLIMIT_AS", "nofile": "RLIMIT_NOFILE"}[limit]
    message = (
        f"{task.task} ran past its {describe_limit(limit, task.limits[limit])} ({rlimit}): "
        f"{type_name(type(exc))}: {exc}"
    )
    text = "".join(traceback.format_exception(exc))
    return encode(Result(task.handle, LOST, message=message, traceback=text, limit=limit))


def _raised(handle: str, exc: BaseException, *, tb: bool = True) -> bytes:
    text = _user_traceback(exc) if tb else ""
    msg = Result(handle, RAISED, exc_type=type_name(type(exc)), message=str(exc), traceback=text)
    return encode(msg)


#: the frames that lead to a task's or a hook's code: this module's, importlib's
_OWN_FRAMES = (
    __file__,
    os.path.dirname(str(importlib.__file__)) + os.sep,
    "<frozen importlib.",
)


def _user_traceback(exc: BaseException) -> str:
    """The traceback as the task's author wants it: without the frames of
    this module and of importlib that lead to the task's own code."""
    shown = traceback.TracebackException.from_exception(exc)
    frames = list(shown.stack)
    while frames and frames[0].filename.startswith(_OWN_FRAMES):
        del frames[0]
    shown.stack = traceback.StackSummary.from_list(frames)
    return "".join(shown.format())


def _exit_code(exc: SystemExit) -> tuple[int, str]:
    # The same rules as the interpreter's own exit: None is 0, an int is
    # itself, anything else is printed and means 1.
    if exc.code is None:
        return 0, ""
    if isinstance(exc.code, int):
        return exc.code & 0xFF, ""
    print(exc.code, file=sys.stderr)
    return 1, str(exc.code)
