"""The lives of jobs and child processes as state tables (h11 style). No I/O.

Every state change goes through one checked `move()`; a change the table
does not allow is a bug in the supervisor, raised as `StateError` (the event
loop logs and counts it, and carries on) instead of being carried silently
into a wrong outcome. The worker slots (`--max-workers`) are not counted by
hand: a child holds one while it has a job and is in a SLOT_STATES state,
and `Slots` follows that from the moves, so a slot cannot leak.

    job:    QUEUED ──▶ STARTING ──▶ RUNNING ──▶ DONE
              ▲  │        │ (start failed, retried)
              │  └────────┼──▶ RUNNING  (a ready pool child took it)
              └───────────┘    DONE from any state (refused, failed)

    child:  FORKING ──▶ STARTING ──▶ RUNNING ──▶ FINISHING ──▶ EXITED ──▶ ENDED
               │           │  └──▶ IDLE ──┘ (pool)   any live state ──▶ EXITED
               │           │        └──▶ RETIRING ──▶ EXITED     FINISHING ──▶ PROMOTED
               └───────────┴──▶ ENDED  (never forked, or never handed over)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

S = TypeVar("S", bound=enum.Enum)


class StateError(RuntimeError):
    """A state change that the tables do not allow: a supervisor bug."""


class JobState(enum.Enum):
    QUEUED = "queued"  # waiting for a worker slot and a ready zygote
    STARTING = "starting"  # a child is being forked and checked for it
    RUNNING = "running"  # its worker has the task
    DONE = "done"  # ended, failed or refused: its outcome went to the clients


class ChildState(enum.Enum):
    FORKING = "forking"  # fork requested; the zygote has not answered
    STARTING = "starting"  # forked; its hooks and validators run
    IDLE = "idle"  # ready, in the ready pool, waiting for a task
    RUNNING = "running"  # ready, with its task
    FINISHING = "finishing"  # its result is in; it runs its exit hooks and exits
    RETIRING = "retiring"  # a pool child let go: its channel was closed
    EXITED = "exited"  # the process is gone; its exit status may still be on the way
    ENDED = "ended"  # its exit status is known (or was lost with its zygote)
    PROMOTED = "promoted"  # its task done, it became a zygote (a refork): the fleet's now


JOB_MOVES: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.RUNNING, JobState.DONE}),
    JobState.STARTING: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.DONE}),
    JobState.RUNNING: frozenset({JobState.DONE}),
    JobState.DONE: frozenset(),
}

_LIVE = frozenset(
    {
        ChildState.STARTING,
        ChildState.IDLE,
        ChildState.RUNNING,
        ChildState.FINISHING,
        ChildState.RETIRING,
    }
)

CHILD_MOVES: Mapping[ChildState, frozenset[ChildState]] = {
    # ENDED without a process: the fork failed, its zygote went first, or
    # the supervisor could not take it over (and killed it).
    ChildState.FORKING: frozenset({ChildState.STARTING, ChildState.ENDED}),
    ChildState.STARTING: frozenset({ChildState.IDLE, ChildState.RUNNING, ChildState.EXITED}),
    ChildState.IDLE: frozenset({ChildState.RUNNING, ChildState.RETIRING, ChildState.EXITED}),
    ChildState.RUNNING: frozenset({ChildState.FINISHING, ChildState.EXITED}),
    ChildState.FINISHING: frozenset({ChildState.EXITED, ChildState.PROMOTED}),
    ChildState.RETIRING: frozenset({ChildState.EXITED}),
    ChildState.EXITED: frozenset({ChildState.ENDED}),
    ChildState.ENDED: frozenset(),
    ChildState.PROMOTED: frozenset(),
}

#: A child with a job holds a worker slot in these states: from its fork
#: request until its process is gone.
SLOT_STATES = frozenset(
    {ChildState.FORKING, ChildState.STARTING, ChildState.RUNNING, ChildState.FINISHING}
)


def is_live(state: ChildState) -> bool:
    """A forked child whose process has not been seen to exit."""
    return state in _LIVE


def check(table: Mapping[S, frozenset[S]], what: str, old: S, new: S) -> None:
    """Raise StateError unless `table` allows `old` → `new`."""
    if new not in table[old]:
        raise StateError(f"{what}: {old.value} → {new.value} is not a valid move")


class Slots:
    """The `--max-workers` slots, counted from the children's moves."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    @property
    def free(self) -> bool:
        return self.taken < self.limit

    def moved(self, held_before: bool, held_after: bool) -> None:
        self.taken += held_after - held_before
        if self.taken < 0:
            raise StateError("more worker slots released than taken")
