"""Hooks that preloaded code registers with the zygote.

Imported by application code inside the zygote, so it must stay cheap and
must never import zmq: libzmq starts I/O threads with its first socket, and
the zygote has to stay single-threaded to fork safely.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["after_fork", "validator"]

F = TypeVar("F", bound=Callable[[], object])

# Filled at import time of preloaded modules, read in each new worker.
AFTER_FORK: list[Callable[[], object]] = []
VALIDATORS: dict[str, Callable[[], object]] = {}


def _name(func: Callable[[], object]) -> str:
    module = getattr(func, "__module__", None) or "?"
    return f"{module}:{getattr(func, '__qualname__', repr(func))}"


def after_fork(func: F) -> F:
    """Run `func()` in every new worker right after the fork, before the
    validators (re-seed random generators, reopen connections, ...)."""
    AFTER_FORK.append(func)
    return func


def validator(func: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register a check that runs in every new worker before it is trusted.

    A validator that raises, or does not return within the validate timeout,
    marks the child corrupt: it is killed and replaced. Use it as
    ``@zygote.validator`` or ``@zygote.validator(name="db")``.
    """

    def register(f: F) -> F:
        VALIDATORS[name or _name(f)] = f
        return f

    return register(func) if func is not None else register
