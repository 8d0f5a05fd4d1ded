"""The zygote's thread inventory, taken before every fork.

A thread running at the instant of fork() does not exist in the child, but
every lock it held stays held there, forever. So before each fork the
zygote lists every thread besides its own: Python threads (name, ids,
daemon flag, what it runs, where it was started and the file:line it is
executing) and native threads that no Python thread stands for (from
/proc/self/task: OpenBLAS's pool, ZMQbg/*, gRPC's pollers), and the
`Report` turns them into one stable warning per kind of thread.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .. import hooks
from ..linux import native_threads

#: native thread id -> the preload module whose import started it. Native
#: threads rarely have telling names (OpenBLAS's are called "python"), so
#: the zygote notes, module by module, which import made them.
ORIGINS: dict[int, str] = {}

#: Python thread -> (where its start() was called, the preload module being
#: imported then, what it runs), recorded by the wrapped `Thread.start`.
STARTS: weakref.WeakKeyDictionary[threading.Thread, tuple[str, str, str]] = (
    weakref.WeakKeyDictionary()
)

#: the preload module being imported right now, if any
importing = ""


@dataclass(frozen=True)
class ThreadInfo:
    kind: str  # "python" or "native"
    name: str
    native_id: int
    ident: int | None = None
    daemon: bool | None = None
    where: str = ""  # the Python thread's current file:line and function
    origin: str = ""  # the preload module whose import started it, if known
    allowed: bool = False  # on the allowlist, or marked fork-safe
    target: str = ""  # what a Python thread runs (module:function)
    started_at: str = ""  # where its start() was called: "module (file:line)"

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What makes threads 'the same thread' for warnings: not their ids
        (a server's request threads are new for every request), but the
        kind, the name with its numbers blurred, what runs and who started it."""
        return (
            self.kind,
            _NUMBERS.sub("N", self.name),
            self.target,
            self.started_at or self.origin,
        )

    def describe(self) -> str:
        """The thread in words, the same every time it is seen."""
        if self.kind == "native":
            what = f"native thread {self.name!r}"
            return what + (f", started while importing {self.origin}" if self.origin else "")
        what = f"Python thread {self.name!r}"
        if self.target:
            what += f" ({self.target})"
        if self.started_at:
            what += f", started by {self.started_at}"
        if self.origin and not self.started_at.startswith(f"{self.origin} ("):
            what += f", while importing {self.origin}"
        return what

    def advice(self) -> str:
        """What to do about it, for its warning."""
        if self.kind == "native":
            return (
                "The fork guards cannot see into native code. If it is harmless (numpy's "
                "OpenBLAS pool is: numpy stops it at fork), vouch for it with --allow-thread "
                f"{self.origin or self.name!r}; if not, use its library from a "
                "@zygote.background function (the helper process) or import it in each "
                "worker (an @zygote.after_fork hook), not in the zygote."
            )
        return (
            "The fork guards keep it out of logging, OpenSSL (ssl, hashlib, hmac) and the "
            "resolver at each fork; wrap anything else it locks in zygote.prevent_fork(). "
            "For no thread in the zygote at all, run its loop as a @zygote.background "
            "function (the helper process) or start it in each worker (--thread-policy "
            f"defer); or vouch for it with --allow-thread {self.name!r} or "
            "zygote.mark_fork_safe()."
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Numbers, and hex runs with a digit in them (ids, tokens): "Thread-12",
#: "conn-3fa2b1c9" and "ThreadPoolExecutor-0_1" are kinds of thread, not one each.
_NUMBERS = re.compile(r"[0-9a-fA-F]*\d[0-9a-fA-F]*")


def take(allow: Sequence[str] = ()) -> list[ThreadInfo]:
    """Every thread of this process except the calling one."""
    if len(os.listdir("/proc/self/task")) == 1:  # the common case: only us
        PYTHON_TIDS.clear()
        return []
    # Forget the Python threads that are gone for good (their ids are not
    # reused before the kernel's pid counter wraps around).
    for old in list(PYTHON_TIDS):  # one atomic copy: other threads add to it
        if not os.path.exists(f"/proc/self/task/{old}"):
            PYTHON_TIDS.discard(old)
    me = threading.get_native_id()
    natives = native_threads()
    natives.pop(me, None)
    frames = sys._current_frames()
    found = []
    # Threads come and go while we look; each is listed once, in its Python
    # view when it has one. One that started since /proc was read is
    # running: it counts. One that ended since is gone: it does not.
    starting = []
    current = threading.current_thread()
    for thread in threading.enumerate():
        tid = thread.native_id
        # In a forked child (a worker promoted to zygote), the calling
        # thread's object keeps the parent's native id: know it by identity.
        if tid == me or thread is current:
            continue
        if tid is None:  # its OS thread runs, but has not had the GIL yet
            starting.append(thread)
            continue
        if natives.pop(tid, None) is None and not thread.is_alive():
            continue
        found.append(_python_thread(thread, tid, frames, allow))
    # A starting thread shows in /proc with no Python view to match it (for
    # as long as it waits for the GIL: milliseconds, seen here). Thread ids
    # are handed out in increasing order: the newest unmatched ones are them.
    for thread, tid in zip(starting, sorted(natives, reverse=True), strict=False):
        del natives[tid]
        found.append(_python_thread(thread, tid, frames, allow))
    # An ending one is out of threading.enumerate() before its OS thread is
    # gone; threading still knows it (weakly) as long as anyone holds it.
    # Listed as what it was (a tid reused by a native thread would be
    # mislabelled, but still listed: a fork with it is still guarded).
    try:
        ended = list(getattr(threading, "_dangling", ()))
    except RuntimeError:  # a thread was made while we copied: no matter
        ended = []
    for thread in ended:
        if thread.native_id in natives and thread.native_id != me:
            del natives[thread.native_id]
            found.append(_python_thread(thread, thread.native_id, frames, allow))
    for tid, comm in sorted(natives.items()):
        if not os.path.exists(f"/proc/self/task/{tid}"):
            continue  # a Python thread that ended after /proc was read
        if tid in PYTHON_TIDS:
            # A Python thread on its way out: gone from threading's view and
            # past its last line of Python, not yet from /proc (seen under
            # load: a churning pool's ended thread reported as native).
            continue
        origin = ORIGINS.get(tid, "")
        allowed = (
            tid in hooks.FORK_SAFE_NATIVE
            or _matches(comm, allow)
            or bool(origin and _matches(origin, allow))
        )
        found.append(ThreadInfo("native", comm, tid, origin=origin, allowed=allowed))
    return found


def _python_thread(
    thread: threading.Thread, tid: int, frames: dict[int, Any], allow: Sequence[str]
) -> ThreadInfo:
    frame = frames.get(thread.ident) if thread.ident is not None else None
    where = ""
    if frame is not None:
        code = frame.f_code
        where = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
    # What it runs, as noted at its start: a thread that has ended has
    # forgotten its target by now.
    started_at, origin, target = STARTS.get(thread, ("", "", ""))
    allowed = thread in hooks.FORK_SAFE_THREADS or _matches(thread.name, allow)
    return ThreadInfo(
        "python",
        thread.name,
        tid,
        thread.ident,
        thread.daemon,
        where,
        origin=origin,
        allowed=allowed,
        target=target or _target(thread),
        started_at=started_at,
    )


def _target(thread: threading.Thread) -> str:
    func = getattr(thread, "_target", None)
    if func is None:  # a Thread subclass: its run() is what runs
        func = type(thread).run
    module = getattr(func, "__module__", None) or "?"
    return f"{module}:{getattr(func, '__qualname__', type(func).__name__)}"


def note_origins(module: str, before: set[int]) -> None:
    """Attribute native threads that appeared since `before` to `module`."""
    for tid in native_threads().keys() - before:
        ORIGINS.setdefault(tid, module)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """Patterns match a thread's name, or the module whose import started it."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


# -- where threads are started ---------------------------------------------------

_STDLIB = tuple(
    os.path.realpath(p) + os.sep
    for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
)
# The whole zygote package, hooks.py included, not just this room of it.
_OWN = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep


def _library_frame(filename: str) -> bool:
    """True for code a user would recognise as theirs or a library's: not
    the standard library (site-packages excepted), not zygote, not frozen."""
    if filename.startswith("<"):
        return False
    path = os.path.realpath(filename)
    if path.startswith(_OWN):
        return False
    if "site-packages" in path or "dist-packages" in path:
        return True
    return not path.startswith(_STDLIB)


def start_site(depth: int = 2) -> str:
    """Where the caller's caller was called from, as "module (file:line)":
    the first frame outside the standard library and zygote (a library's
    frame, not `threading.py` or `concurrent/futures`), else the first one
    outside threading.py."""
    frame: types.FrameType | None = sys._getframe(depth)
    fallback = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if _library_frame(filename):
            break
        if fallback is None and not filename.endswith("threading.py"):
            fallback = frame
        frame = frame.f_back
    frame = frame or fallback
    if frame is None:
        return ""
    module = frame.f_globals.get("__name__", "?")
    return f"{module} ({frame.f_code.co_filename}:{frame.f_lineno})"


_start = threading.Thread.start
_recording = False
_deferring = False

_join = threading.Thread.join

#: Daemon threads whose start() was held back while preloading
#: (--thread-policy defer), to be started in each worker instead.
DEFERRED: list[threading.Thread] = []
#: The kernel thread ids of Python threads started (while recording) that
#: may still be in /proc: an ended one is not taken for a native thread.
PYTHON_TIDS: set[int] = set()


def record_thread_starts(*, defer: bool = False) -> None:
    """Note where every `Thread.start()` of this process is called from, so
    that a warning names the library and line that started a thread; with
    `defer`, also hold back the starts of daemon threads (until
    `stop_deferring()`). For the zygote only; a worker stops recording (it
    costs a stack walk).

    Only daemon threads are deferred: they are the ones that run in the
    background for the life of the process (exporters, flushers, pollers).
    A thread the program waits for is not a daemon (a ThreadPoolExecutor's
    are not): OpenTelemetry's resource detection, for one, runs in a pool
    it shuts down and joins while it is imported, and would wait forever
    for a thread that never started."""
    global _recording, _deferring
    _deferring = defer
    if _recording:
        return
    _recording = True

    def start(self: threading.Thread) -> None:
        if _recording:
            STARTS[self] = (start_site(), importing, _target(self))
            if _deferring and self.daemon:
                # A library that sees its thread "not alive" makes another
                # (sentry-sdk, once per event): keep the newest one only.
                DEFERRED[:] = [t for t in DEFERRED if not _same_thread(t, self)]
                DEFERRED.append(self)
                return
        _start(self)
        if self.native_id is not None:  # set before start() returns
            PYTHON_TIDS.add(self.native_id)

    def join(self: threading.Thread, timeout: float | None = None) -> None:
        # A deferred thread waited for during the preload after all: run it.
        if _deferring and any(thread is self for thread in DEFERRED):
            DEFERRED[:] = [thread for thread in DEFERRED if thread is not self]
            _start(self)
        _join(self, timeout)

    threading.Thread.start = start  # type: ignore[method-assign]
    threading.Thread.join = join  # type: ignore[method-assign]


def _same_thread(a: threading.Thread, b: threading.Thread) -> bool:
    """The same thread in all but identity: same name, same target."""
    target = getattr(a, "_target", None)
    return a is b or (
        a.name == b.name and target is not None and target == getattr(b, "_target", None)
    )


def stop_deferring() -> None:
    global _deferring
    _deferring = False


def stop_recording() -> None:
    global _recording
    _recording = False


def resume_recording() -> None:
    """In a worker promoted to zygote: record thread starts again."""
    global _recording
    _recording = True


def start_deferred() -> None:
    """In a worker: start the threads whose start the preload deferred. One
    that a library already started again by itself after the fork (the same
    name and target, as OpenTelemetry's batch processor does from its
    at-fork hook) is not started twice."""
    running = [t for t in threading.enumerate() if t is not threading.current_thread()]
    for thread in DEFERRED:
        if not any(_same_thread(t, thread) for t in running):
            # Python 3.13+ marks every thread handle but the forking
            # thread's as done in a child, started or not: give it a new one.
            handle = getattr(thread, "_handle", None)
            if handle is not None:
                thread._handle = type(handle)()  # type: ignore[attr-defined]
            _start(thread)


# -- the report ---------------------------------------------------------------


class Report:
    """Every kind of thread the zygote has had, with how many run now.

    A thread is reported (and warned about) once per kind (`ThreadInfo.key`),
    not per fork or per id: a server's request threads, each new, are one
    entry; a thread that stops (OpenBLAS's pool after the first fork) stays
    listed, as not running."""

    #: Kinds kept at most: the oldest that no longer run make room first. A
    #: zygote whose threads are all different kinds (names with random
    #: parts the blurring misses) must not grow without bound.
    LIMIT = 64

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.overflowed = False  # some kinds were left out: the report is full

    def update(self, threads: Sequence[ThreadInfo]) -> tuple[list[ThreadInfo], bool]:
        """Record the threads running now. Returns the kinds seen for the
        first time, and whether the report changed."""
        counts: dict[tuple[str, str, str, str], int] = {}
        latest: dict[tuple[str, str, str, str], ThreadInfo] = {}
        for thread in threads:
            counts[thread.key] = counts.get(thread.key, 0) + 1
            latest[thread.key] = thread
        new = [thread for key, thread in latest.items() if key not in self._entries]
        room = self.LIMIT - len(self._entries)
        if len(new) > room:
            for key in [k for k, e in self._entries.items() if k not in counts]:
                if len(new) <= room:
                    break
                del self._entries[key]
                room += 1
            if len(new) > room:
                self.overflowed = True
                for thread in new[max(room, 0) :]:
                    del latest[thread.key]
                new = new[: max(room, 0)]
        changed = bool(new)
        for key, entry in self._entries.items():
            running = counts.get(key, 0)
            if entry["running"] != running:
                entry["running"] = running
                changed = True
        for key, thread in latest.items():
            entry = self._entries.setdefault(key, {})
            fresh = {**thread.as_dict(), "description": thread.describe(), "running": counts[key]}
            if entry.get("allowed") != fresh["allowed"]:
                changed = True
            entry.update(fresh)
        return new, changed

    def entries(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self._entries.values()]


def unknown(error: BaseException) -> ThreadInfo:
    """Stands for threads the inventory could not list: the fork treats the
    zygote as threaded (guards and probes on) rather than as thread-free."""
    return ThreadInfo("native", "?", 0, origin=f"(the inventory failed: {error!r})")
