"""Hooks that preloaded code registers with the zygote.

Imported by application code inside the zygote, so it must stay cheap and
must never import zmq: libzmq starts I/O threads with its first socket, and
the zygote has to stay single-threaded to fork safely.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Protocol, TypeVar

from .child.gate import GATE
from .child.outbox import background

__all__ = [
    "after_fork",
    "background",
    "before_exit",
    "before_refork",
    "fork_lock",
    "mark_fork_safe",
    "no_longer_fork_safe",
    "prevent_fork",
    "validator",
]

F = TypeVar("F", bound=Callable[[], object])

# Filled at import time of preloaded modules, read in each new worker.
AFTER_FORK: list[Callable[[], object]] = []
BEFORE_EXIT: list[Callable[[], object]] = []
BEFORE_REFORK: list[Callable[[], object]] = []
#: Why this worker may not become a zygote (set by no_longer_fork_safe()).
NOT_FORK_SAFE: list[str] = []
VALIDATORS: dict[str, Callable[[], object]] = {}
# Threads the application vouches for (they hold no lock a child needs).
FORK_SAFE_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
FORK_SAFE_NATIVE: set[int] = set()
FORK_LOCKS: list[_Lock] = []


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...


def _name(func: Callable[[], object]) -> str:
    module = getattr(func, "__module__", None) or "?"
    return f"{module}:{getattr(func, '__qualname__', repr(func))}"


def after_fork(func: F) -> F:
    """Run `func()` in every new worker right after the fork, before the
    validators (re-seed random generators, reopen connections, ...)."""
    AFTER_FORK.append(func)
    return func


def before_exit(func: F) -> F:
    """Run `func()` in every worker after its task (whatever its outcome),
    before the process ends: flush what the task buffered (telemetry spans,
    error reports). The hooks share the server's `--exit-timeout`; one that
    runs past it is cut off."""
    BEFORE_EXIT.append(func)
    return func


def before_refork(func: F) -> F:
    """Run `func()` in a worker chosen to become the next zygote generation
    (a refork), after its task and its before_exit hooks: close what belongs
    to one task (connections, temp files, a thread pool) so the new zygote's
    children do not share it. A hook that raises rules the worker out."""
    BEFORE_REFORK.append(func)
    return func


def no_longer_fork_safe(reason: str = "") -> None:
    """Rule the calling worker out as a refork candidate: call it from a task
    that left something behind a fork must not copy (a thread, a connection
    in use, a lock held). The worker then ends as usual after its task."""
    NOT_FORK_SAFE.append(reason or "no_longer_fork_safe() was called")


def validator(func: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register a check that runs in every new worker before it is trusted.

    A validator that raises, or does not return within the validate timeout,
    marks the child corrupt: it is killed and replaced. Use it as
    ``@zygote.validator`` or ``@zygote.validator(name="db")``; the name (by
    default "module:function") is what logs, stats and
    ``--disable-validator`` use.
    """

    def register(f: F) -> F:
        VALIDATORS[name or _name(f)] = f
        return f

    return register(func) if func is not None else register


def mark_fork_safe(thread: threading.Thread | int) -> None:
    """Vouch that a thread in the zygote never holds a lock a child needs, so
    the thread inventory stops warning about it. Pass a `threading.Thread`,
    or the native id of a thread Python does not know about."""
    if isinstance(thread, int):
        FORK_SAFE_NATIVE.add(thread)
    else:
        FORK_SAFE_THREADS.add(thread)


def fork_lock(lock: _Lock) -> _Lock:
    """Register `lock` to be acquired around every fork of the zygote, so no
    thread holds it at the instant of the fork; returns it. The child gets it
    unlocked (re-created, so a lock that another at-fork hook re-creates too,
    like a logging handler's, works as well)."""
    FORK_LOCKS.append(lock)
    return lock


def prevent_fork() -> contextlib.AbstractContextManager[None]:
    """Hold off the zygote's forks while the block runs (from any thread).

    Use it around work that takes a lock a child would need (a TLS
    handshake, a write to a shared log): a fork requested meanwhile waits
    until the block ends. Outside a zygote it does nothing.
    """
    if not GATE.active:
        return contextlib.nullcontext()
    return GATE.passing(f"prevent_fork() in {_caller()}")


def _caller() -> str:
    frame = sys._getframe(2)
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_code.co_name}"
