"""Preload for the generation tests: a lazily imported module, tasks that
leave something behind a fork must not copy, and a validator a task can
poison (so that a refork candidate's probe child fails)."""

from __future__ import annotations

import os
import sys
import threading
import time

import zygote

POISONED = False
REFORK_HOOKS_RAN = 0


@zygote.validator(name="poison-check")
def _poison_check() -> None:
    if POISONED:
        raise RuntimeError("this generation was poisoned by a task")


@zygote.before_refork
def _close_per_task_state() -> None:
    global REFORK_HOOKS_RAN
    REFORK_HOOKS_RAN += 1


def lazy() -> dict:
    """Use a module the preload does not import (it takes 0.3 s to import):
    was it already there? In a worker of a promoted generation, it was."""
    was_loaded = "tests.slow_import" in sys.modules
    import tests.slow_import  # noqa: F401

    return {"was_loaded": was_loaded, "pid": os.getpid(), "hooks_ran": REFORK_HOOKS_RAN}


def leave_thread() -> str:
    threading.Thread(target=time.sleep, args=(3600,), name="poller", daemon=True).start()
    return "left a thread running"


def unsafe() -> str:
    zygote.no_longer_fork_safe("it holds a connection in use")
    return "unsafe"


def poison() -> str:
    global POISONED
    POISONED = True
    return "poisoned"
