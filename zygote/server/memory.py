"""Memory figures for `zygote status`: RSS, PSS and USS of the supervisor,
the zygotes, their helpers and every worker, from /proc/PID/smaps_rollup.

Reading smaps_rollup makes the kernel walk the process's page tables:
15-19 ms (up to 50) for a 280 MB heap of small Python objects, in the zygote
and again in each of its forks. Done in the loop, a `stats()` poll would
stall every client and worker event behind it (tests, `zygote reload` and
benchmarks poll stats() every 10-100 ms). So a thread of the supervisor
reads them and publishes a new dict whole; the loop only looks the figures
up, and `stats()` stays as cheap as before. The thread reads nothing but
/proc and touches no other state. It reads every `IDLE_PERIOD` seconds, and
when a stats() call finds the figures more than `FRESH` seconds old; their
`age` says how old they are.
Part of the supervisor process.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..linux import Memory, child_pids, memory_usage
from .children import Child, ZygoteProc

log = logging.getLogger("zygote.supervisor")

#: A stats() call that finds figures older than this wakes the reader: the
#: next call gets fresh ones (`zygote status` waits for them).
FRESH = 1.0
#: Seconds between readings when nobody asks.
IDLE_PERIOD = 10.0


@dataclass(frozen=True, slots=True)
class Reading:
    memory: Memory
    at: float  # when it was read (the loop's clock)


Readings = Mapping[int, Reading]


class MemoryReader:
    """Reads the memory of the supervisor and its descendants (two levels:
    zygotes and orphans, then workers and helpers) in a thread of its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._readings: dict[int, Reading] = {}
        self._read_at = -math.inf
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def started(cls, clock: Callable[[], float] = time.monotonic) -> MemoryReader:
        """A reader with its thread running."""
        reader = cls(clock)
        reader._thread = threading.Thread(target=reader._run, name="zygote-memory", daemon=True)
        reader._thread.start()
        return reader

    def readings(self) -> Readings:
        """The latest figures by pid. The thread replaces the dict whole,
        never changes it, so the loop reads a consistent snapshot."""
        if self.clock() - self._read_at > FRESH:
            self._wake.set()
        return self._readings

    def report(
        self,
        readings: Readings,
        children: Iterable[Child],
        profiles: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        """`server_memory()` as of now."""
        return server_memory(readings, children, profiles, self.clock())

    def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._readings = self._read_all()
            except Exception:  # never let a /proc surprise end the thread
                log.exception("reading memory figures failed")
            # From the end: however long a round takes, a poller gets the
            # thread reading at most (round / (round + FRESH)) of the time.
            self._read_at = self.clock()
            self._wake.wait(IDLE_PERIOD)

    def _read_all(self) -> dict[int, Reading]:
        me = os.getpid()
        pids = {me, *child_pids(me)}
        for pid in list(pids - {me}):
            pids |= child_pids(pid)
        readings = {}
        mine = memory_usage(me)
        for pid in pids:
            at = self.clock()  # before the read: a process started later is not this one
            memory = memory_usage(pid)
            # A zygote caught between vfork and exec (subprocess) shares our
            # memory, and reads the same to the byte: seen here, once.
            if memory is not None and (pid == me or memory != mine):
                readings[pid] = Reading(memory, at)
        return readings


def figure(readings: Readings, pid: int | None, since: float = -math.inf) -> Memory | None:
    """The figures of `pid` if they were read after `since` (its start): a
    reused pid's figures would be another process's."""
    reading = readings.get(pid) if pid is not None else None
    return reading.memory if reading is not None and reading.at >= since else None


def lineage_memory(readings: Readings, zygote: ZygoteProc | None) -> dict[str, int | None]:
    """A profile's zygote's RSS and PSS, and its helper's PSS (None: not read yet)."""
    mine = figure(readings, zygote.pid, zygote.started) if zygote else None
    helper = figure(readings, zygote.helper_pid) if zygote else None
    return {
        "zygote_rss": mine.rss if mine else None,
        "zygote_pss": mine.pss if mine else None,
        "helper_pss": helper.pss if helper else None,
    }


def server_memory(
    readings: Readings,
    children: Iterable[Child],
    profiles: Mapping[str, Mapping[str, Any]],
    now: float,
) -> dict[str, Any]:
    """Each worker's (and ready-pool child's) USS, PSS and RSS, the
    supervisor's, and the total PSS: the sum of every figure shown here and in
    `profiles` (each profile's zygote and helper) — what the server uses."""
    workers: list[dict[str, Any]] = []
    for child in children:
        # No `since`: a pool child's `requested` restarts when it takes a job.
        # An earlier process's reading under the same pid would need the pid
        # space to wrap around within one reading period.
        memory = figure(readings, child.pid)
        if child.pid and memory is not None:
            state = child.state.value
            profile = child.zygote.profile
            workers.append({"pid": child.pid, "profile": profile, "state": state})
            workers[-1].update(memory._asdict())
    supervisor = figure(readings, os.getpid())
    pss = [supervisor.pss if supervisor else 0]
    pss += [p["zygote_pss"] or 0 for p in profiles.values()]
    pss += [p["helper_pss"] or 0 for p in profiles.values()]
    pss += [w["pss"] for w in workers]
    oldest = min((r.at for r in readings.values()), default=None)
    return {
        "supervisor_pss": supervisor.pss if supervisor else None,
        "workers": sorted(workers, key=lambda w: w["pid"]),
        "total_pss": sum(pss),
        "age": None if oldest is None else round(now - oldest, 1),  # seconds
    }
