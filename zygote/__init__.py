"""zygote: a fork server for Python batch workers.

Preload your code once in a zygote process; run every job in a fresh,
checked fork of it. The client (`Zygote`, `Handle`) needs pyzmq and is
imported lazily, so that preloaded code can `import zygote` to register
hooks without pulling ZeroMQ (and its threads) into the zygote.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ServerBusy,
    ServerUnavailable,
    SpawnError,
    TaskError,
    TaskTimeout,
    WorkerLost,
    ZygoteError,
    ZygoteTimeout,
)
from .hooks import (
    after_fork,
    background,
    before_exit,
    before_refork,
    fork_lock,
    mark_fork_safe,
    no_longer_fork_safe,
    prevent_fork,
    validator,
)
from .sharing import share

__version__ = "0.1.0"

__all__ = [
    "ExitInfo",
    "Handle",
    "ServerBusy",
    "ServerUnavailable",
    "SpawnError",
    "TaskError",
    "TaskTimeout",
    "WorkerLost",
    "Zygote",
    "ZygoteError",
    "ZygoteTimeout",
    "__version__",
    "after_fork",
    "background",
    "before_exit",
    "before_refork",
    "fork_lock",
    "mark_fork_safe",
    "no_longer_fork_safe",
    "prevent_fork",
    "share",
    "validator",
]

if TYPE_CHECKING:
    from .client import ExitInfo, Handle, Zygote

_CLIENT_NAMES = frozenset({"Zygote", "Handle", "ExitInfo"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'zygote' has no attribute {name!r}")
