"""Fork guards: the zygote forks only at a moment when no other thread is
inside what the child will need.

This is pthread_atfork's discipline, applied from Python. Right before a fork
(only when the zygote has other threads: with none, nothing can be held) the
zygote takes

* the fork gate (`zygote.child.gate`) exclusively: no thread is inside OpenSSL,
  the resolver or a `prevent_fork()` section;
* the logging module's lock and every handler's lock: a thread inside
  `Handler.handle` (an emit, a rollover, the stream's buffer lock under it)
  finishes first;
* every lock registered with `fork_lock()`.

The parent releases them after the fork; the child re-creates them, and
replaces its stdio and handler streams with fresh objects on the same
descriptors (a buffer lock taken outside any guard, by a `print()` from a
thread, would otherwise stay held).

A thread may hold one guard while it waits for another (a handler that makes
an HTTPS request holds its lock and enters the gate; a `prevent_fork()`
section logs), so a fork never blocks on one guard while it holds another
for long: a lock it cannot take within a short slice makes it let everything
go and start over, until `fork_guard_timeout`; then it forks with what it
has, and names what it could not take and who held it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..hooks import _Lock
from .gate import GATE, thread_name

__all__ = ["NOTHING", "Held", "hold", "repair_streams"]


#: Waiting on one lock while holding others is bounded by this slice; past
#: it, everything is let go (the holder may be waiting for one of ours) and
#: taken again from the start.
_SLICE = 0.02


class _Guard(Protocol):
    """One thing a fork takes: a lock, or the gate."""

    name: str

    def take(self, timeout: float) -> bool: ...
    def release(self) -> None: ...
    def reset_in_child(self) -> None: ...
    def holders(self) -> list[str]: ...


class _LockGuard:
    def __init__(self, name: str, lock: _Lock) -> None:
        self.name = name
        self.lock = lock

    def take(self, timeout: float) -> bool:
        if timeout <= 0:
            return self.lock.acquire(False)
        return self.lock.acquire(True, timeout)

    def release(self) -> None:
        self.lock.release()

    def reset_in_child(self) -> None:
        # logging re-creates its own locks in the child, and so may anyone
        # else's at-fork hook: a lock re-created that way is no longer ours
        # to release ("cannot release un-acquired lock"). Re-create it.
        reinit = getattr(self.lock, "_at_fork_reinit", None)
        if reinit is not None:
            reinit()
            return
        with contextlib.suppress(RuntimeError, ValueError):
            self.lock.release()

    def holders(self) -> list[str]:
        owner = _OWNER.search(repr(self.lock))  # an RLock says who holds it
        if owner and int(owner.group(1)):
            return [thread_name(int(owner.group(1)))]
        return []


_OWNER = re.compile(r"owner=(\d+)")


class _GateGuard:
    name = "the OpenSSL/resolver/prevent_fork() gate"

    def take(self, timeout: float) -> bool:
        if GATE.close(timeout):
            return True
        GATE.open()
        return False

    def release(self) -> None:
        GATE.open()

    def reset_in_child(self) -> None:
        GATE.reset_in_child()

    def holders(self) -> list[str]:
        return GATE.visitors()


@dataclass
class Held:
    """What a fork holds: release it in the parent, reset it in the child."""

    guards: list[_Guard] = field(default_factory=list)
    waited: float = 0.0  # seconds spent waiting for threads to let go
    #: what the fork went ahead without, each with who held it
    missed: list[str] = field(default_factory=list)

    def release(self) -> None:
        for guard in reversed(self.guards):
            guard.release()

    def reset_in_child(self) -> None:
        for guard in reversed(self.guards):
            guard.reset_in_child()


NOTHING = Held()


_MODULE_LOCK = "the logging module lock"


def _guards(fork_locks: list[_Lock]) -> list[_Guard]:
    """The gate first (it is waited for holding nothing else), then the
    locks in logging's own order: module lock, then handler locks. Each
    lock once (a fork_lock() may be a handler's, or registered twice)."""
    guards: list[_Guard] = [_GateGuard(), _LockGuard(_MODULE_LOCK, logging._lock)]  # type: ignore[attr-defined]
    seen = {id(logging._lock)}  # type: ignore[attr-defined]
    handlers = [ref() for ref in list(logging._handlerList)]  # type: ignore[attr-defined]
    locks = [(f"the lock of {h!r}", h.lock) for h in handlers if h is not None and h.lock]
    locks += [(f"fork_lock {lock!r}", lock) for lock in fork_locks]
    for name, lock in locks:
        if id(lock) not in seen:
            seen.add(id(lock))
            guards.append(_LockGuard(name, lock))
    return guards


def hold(timeout: float, fork_locks: list[_Lock]) -> Held:
    """Take every guard, waiting at most `timeout` for threads to let go.
    Past it, take what is free and report the rest as missed."""
    started = time.monotonic()
    deadline = started + timeout
    guards = _guards(fork_locks)
    contended = False
    while True:
        held: list[_Guard] = []
        miss: _Guard | None = None
        for guard in guards:
            if guard.take(0):
                held.append(guard)
                continue
            contended = True
            # The gate is waited for while nothing else is held; a lock only
            # for a slice (its holder may be waiting for the gate).
            remaining = deadline - time.monotonic()
            if guard.take(remaining if not held else min(_SLICE, remaining)):
                held.append(guard)
                continue
            miss = guard
            break
        if miss is None:
            waited = time.monotonic() - started if contended else 0.0
            return Held(held, waited, _still_inside())
        for guard in reversed(held):
            guard.release()
        if time.monotonic() >= deadline:
            return _hold_what_is_free(guards, started)
        # Let its holder finish, holding nothing it might be waiting for.
        if miss.take(min(_SLICE, deadline - time.monotonic())):
            miss.release()


def _hold_what_is_free(guards: list[_Guard], started: float) -> Held:
    """The last attempt: what is free now is held, the rest is named. The
    gate stays closed to new visitors even with some still inside, and
    those are not waited for again.

    Except without logging's module lock: os.fork() takes it itself, with
    no timeout, and its holder may need one of ours to let go of it (a
    dictConfig() building a handler that resolves a name). Then nothing is
    held: the fork waits for that lock alone, holding nothing."""
    held = Held()
    for guard in guards:
        if isinstance(guard, _GateGuard):
            GATE.close(0)
            GATE.give_up_on_visitors()
            held.guards.append(guard)
        elif guard.take(0):
            held.guards.append(guard)
        else:
            holders = ", ".join(guard.holders()) or "a thread"
            held.missed.append(f"{guard.name} (held by {holders})")
    held.missed[:0] = _still_inside()
    if any(missed.startswith(_MODULE_LOCK) for missed in held.missed):
        held.release()
        held = Held(
            missed=["every guard, as the fork waits for logging's module lock", *held.missed]
        )
    held.waited = time.monotonic() - started
    return held


def _still_inside() -> list[str]:
    """The visitors of the closed gate: stuck ones, or ones the fork stopped
    waiting for. Called with the gate closed (new visitors wait)."""
    visitors = GATE.visitors()
    return [f"{_GateGuard.name} ({'; '.join(visitors)})"] if visitors else []


# -- repairs in the child -------------------------------------------------------

#: Streams replaced in this child, kept referenced so that their finalizer
#: never runs: it would flush, and block on the buffer lock left held.
REPLACED: list[object] = []


def repair_streams() -> None:
    """Replace sys.stdout/sys.stderr and logging handlers' streams with fresh
    objects on the same descriptors. Call first thing in a child forked
    while other threads ran. Buffered output the zygote had not written yet
    is dropped here (the zygote writes it), not written twice."""
    fresh: dict[int, io.TextIOWrapper] = {}
    for name in ("stdout", "stderr"):
        old = getattr(sys, name)
        new = _fresh_stream(old, fresh)
        if new is not None:
            setattr(sys, name, new)
            if getattr(sys, f"__{name}__") is old:
                setattr(sys, f"__{name}__", new)
    made = {id(stream) for stream in fresh.values()}
    for ref in list(logging._handlerList):  # type: ignore[attr-defined]
        handler = ref()
        old = getattr(handler, "stream", None)
        if id(old) in made:  # logging.lastResort's stream is sys.stderr, read live
            continue
        new = _fresh_stream(old, fresh)
        if new is None:
            continue
        made.add(id(new))
        # Not setStream(): that flushes the old one. A handler whose stream
        # is a read-only property keeps its own (the validators probe it).
        with contextlib.suppress(AttributeError):
            handler.stream = new


def _fresh_stream(old: object, fresh: dict[int, io.TextIOWrapper]) -> io.TextIOWrapper | None:
    """A new text stream on `old`'s descriptor, with its settings; None for
    anything but a text stream over a buffered file descriptor."""
    if id(old) in fresh:
        return fresh[id(old)]
    if not isinstance(old, io.TextIOWrapper) or old.closed:
        return None
    buffer = old.buffer
    raw = getattr(buffer, "raw", None)
    if not isinstance(buffer, io.BufferedWriter) or not isinstance(raw, io.FileIO):
        return None
    new = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(raw.fileno(), raw.mode, closefd=raw.closefd)),
        encoding=old.encoding,
        errors=old.errors,
        line_buffering=old.line_buffering,
        write_through=old.write_through,
    )
    REPLACED.append(old)
    fresh[id(old)] = new
    return new
