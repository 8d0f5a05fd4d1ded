"""The worker: what runs in a freshly forked child of the zygote.

Everything here runs after fork(), in a copy of a process that may have had
other threads. Keep it short, touch little memory (every first write to an
inherited page costs a page copy), and always leave through os._exit() so
that no inherited at-exit handler (OpenSSL's is a known deadlock site) runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import hooks
from .linux import arm_lifeline
from .protocol import (
    EXITED,
    OK,
    RAISED,
    FrameDecoder,
    Go,
    Phase,
    Ready,
    Result,
    Task,
    ValidatorFailed,
    decode_channel,
    encode,
    frame,
)

READY_FRAME = frame(encode(Ready()))

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

    @classmethod
    def from_message(cls, msg: Task) -> PreparedTask:
        return cls(msg.handle, msg.task, msg.payload, msg.env, msg.cwd)

    def prepare(self, *, import_modules: bool) -> None:
        """Resolve the function and decode the arguments, if possible."""
        module = self.task.partition(":")[0]
        if self.func is None and (import_modules or module in sys.modules):
            try:
                self.func = resolve(self.task)
            except Exception:
                if import_modules:
                    raise
        if self.args is None:
            try:
                self.args, self.kwargs = decode_arguments(self.payload)
            except Exception:
                if import_modules:
                    raise


@dataclass
class ChildSetup:
    """What the zygote hands to a new child."""

    channel: socket.socket
    lifeline: int
    close: list[socket.socket | int] = field(default_factory=list)
    task: PreparedTask | None = None
    max_result_bytes: int = 1 << 30


def resolve(task: str) -> Callable[..., Any]:
    """The callable named by "package.module:qualname"."""
    module_name, _, qualname = task.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{task} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


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
    """The child's whole life; returns its exit code. Call in the child only."""
    # The zygote's handlers and wakeup fd must not fire in a worker; SIGINT
    # gets Python's usual KeyboardInterrupt back.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGIO, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for item in setup.close:
        if isinstance(item, int):
            os.close(item)
        else:
            item.close()
    if not arm_lifeline(setup.lifeline):
        return EXIT_ORPHANED  # the supervisor is already gone
    channel = setup.channel

    for name, check in _startup_steps():
        channel.sendall(frame(encode(Phase(name))))
        try:
            check()
        except BaseException as exc:
            error = "".join(traceback.format_exception(exc))
            channel.sendall(frame(encode(ValidatorFailed(name, error))))
            return 1
    channel.sendall(READY_FRAME)

    order = _receive_task(channel)
    if order is None:
        return EXIT_ORPHANED
    task = setup.task if isinstance(order, Go) else PreparedTask.from_message(order)
    if task is None:  # a Go without a task carried along: a supervisor bug
        raise RuntimeError("told to go without a task")
    result, code = _run_task(task, setup.max_result_bytes)
    channel.sendall(frame(result))
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    return code


def _startup_steps() -> list[tuple[str, Callable[[], object]]]:
    steps = [(f"after_fork:{hooks._name(f)}", f) for f in hooks.AFTER_FORK]
    steps.extend(hooks.VALIDATORS.items())
    return steps


def _receive_task(channel: socket.socket) -> Task | Go | None:
    """Block for the one order this worker gets; None if the channel closed."""
    decoder = FrameDecoder()
    while True:
        data = channel.recv(1 << 16)
        if not data:
            return None
        frames = decoder.feed(data)
        if frames:
            msg = decode_channel(frames[0])
            if not isinstance(msg, (Task, Go)):
                raise RuntimeError(f"expected a task, got {msg.KIND}")
            return msg


def _run_task(task: PreparedTask, max_result_bytes: int) -> tuple[bytes, int]:
    """Run it; the encoded Result and the exit code for the process."""
    code = 0
    try:
        if task.env:
            os.environ.update(task.env)
        if task.cwd:
            os.chdir(task.cwd)
        task.prepare(import_modules=True)
        assert task.func is not None and task.args is not None and task.kwargs is not None
        value = task.func(*task.args, **task.kwargs)
    except SystemExit as exc:
        code, message = _exit_code(exc)
        return encode(Result(task.handle, EXITED, exit_code=code, message=message)), code
    except BaseException as exc:
        return _raised(task.handle, exc), code
    try:
        encoded = msgpack.packb(value, use_bin_type=True)
    except Exception as exc:
        unsendable = TypeError(
            f"the result of {task.task} cannot be sent: {exc} (results must be msgpack-able)"
        )
        return _raised(task.handle, unsendable, tb=False), code
    result = encode(Result(task.handle, OK, value=encoded))
    if len(result) > max_result_bytes:
        err = ValueError(
            f"the result of {task.task} is {len(result)} bytes, over the server's "
            f"limit of {max_result_bytes}; write big results to a file and return its path"
        )
        return _raised(task.handle, err, tb=False), code
    return result, code


def _raised(handle: str, exc: BaseException, *, tb: bool = True) -> bytes:
    text = "".join(traceback.format_exception(exc)) if tb else ""
    msg = Result(handle, RAISED, exc_type=type_name(type(exc)), message=str(exc), traceback=text)
    return encode(msg)


def _exit_code(exc: SystemExit) -> tuple[int, str]:
    # The same rules as the interpreter's own exit: None is 0, an int is
    # itself, anything else is printed and means 1.
    if exc.code is None:
        return 0, ""
    if isinstance(exc.code, int):
        return exc.code & 0xFF, ""
    print(exc.code, file=sys.stderr)
    return 1, str(exc.code)
