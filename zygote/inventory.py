"""The zygote's thread inventory, taken before every fork.

A thread running at the instant of fork() does not exist in the child, but
every lock it held stays held there, forever. So before each fork the
zygote lists every thread besides its own: Python threads (name, ids,
daemon flag, and the file:line it is executing) and native threads that no
Python thread stands for (from /proc/self/task: OpenBLAS's pool, ZMQbg/*,
gRPC's pollers), and says so — once per change, not once per fork.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import hooks
from .linux import native_threads

#: native thread id -> the preload module whose import started it. Native
#: threads rarely have telling names (OpenBLAS's are called "python"), so
#: the zygote notes, module by module, which import made them.
ORIGINS: dict[int, str] = {}


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

    def describe(self) -> str:
        if self.kind == "python":
            what = f"Python thread {self.name!r} (native id {self.native_id}"
            what += ", daemon)" if self.daemon else ")"
            if self.where:
                what += f" at {self.where}"
        else:
            what = f"native thread {self.name!r} (tid {self.native_id})"
            if self.origin:
                what += f", started by importing {self.origin},"
        return what + " was running in the zygote at fork time"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def take(allow: Sequence[str] = ()) -> list[ThreadInfo]:
    """Every thread of this process except the calling one."""
    if len(os.listdir("/proc/self/task")) == 1:  # the common case: only us
        return []
    me = threading.get_native_id()
    natives = native_threads()
    natives.pop(me, None)
    frames = sys._current_frames()
    found = []
    for thread in threading.enumerate():
        tid = thread.native_id
        if tid is None or tid not in natives:  # not started yet, or gone
            continue
        natives.pop(tid)
        frame = frames.get(thread.ident) if thread.ident is not None else None
        where = ""
        if frame is not None:
            code = frame.f_code
            where = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        allowed = thread in hooks.FORK_SAFE_THREADS or _matches(thread.name, allow)
        found.append(
            ThreadInfo(
                "python", thread.name, tid, thread.ident, thread.daemon, where, allowed=allowed
            )
        )
    for tid, comm in sorted(natives.items()):
        origin = ORIGINS.get(tid, "")
        allowed = (
            tid in hooks.FORK_SAFE_NATIVE
            or _matches(comm, allow)
            or bool(origin and _matches(origin, allow))
        )
        found.append(ThreadInfo("native", comm, tid, origin=origin, allowed=allowed))
    return found


def note_origins(module: str, before: set[int]) -> None:
    """Attribute native threads that appeared since `before` to `module`."""
    for tid in native_threads().keys() - before:
        ORIGINS.setdefault(tid, module)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """Patterns match a thread's name, or the module whose import started it."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def signature(threads: Sequence[ThreadInfo]) -> frozenset[tuple[str, int, str]]:
    """What identifies a set of threads, to tell when it changed."""
    return frozenset((t.kind, t.native_id, t.name) for t in threads)
