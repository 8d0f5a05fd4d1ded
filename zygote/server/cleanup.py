"""Per-job cleanup and worker limits, the supervisor's side
(docs/cleanup-and-limits.md). Part of the supervisor process.

Two ways, one interface:

* `CgroupCleanup` — where the cgroup v2 hierarchy is writable: a cgroup per
  server, the zygotes in one below it, every forked child in its own. A
  child's cgroup is killed (`cgroup.kill`) when the child exits, the
  server's when it stops, and the watchdog (zygote/watchdog.py) kills it
  if the supervisor is killed. The supervisor moves each child into its
  cgroup on `Forked` (on a thread: mover.py), and lets the child run a task
  (the `Go`, the task, its `Ready` taken in) only once it is there, so
  nothing a task starts is ever outside it.
* `GroupCleanup` — otherwise: each worker leads a process group of its own
  (it calls setpgid itself), killed when the worker exits; processes that
  leave the group (setsid) end up as our children (we are the subreaper)
  once their parent is gone, and are killed when every job that was
  running when they turned up has ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import cgroups, watchdog
from ..cgroups import Cgroup
from ..config import ServerConfig
from ..linux import child_pids, kill_child
from .children import Child
from .loop import EventLoop
from .mover import Mover

log = logging.getLogger("zygote.supervisor")

#: Who is who among our children: (pids that are ours to keep — zygotes,
#: tracked children, the watchdog —, pids of workers running a job now).
Census = Callable[[], tuple[set[int], set[int]]]


def effective_limits(config: ServerConfig, requested: dict[str, float] | None) -> dict[str, float]:
    """The server's limits, lowered (never raised) by a spawn's `_limits`."""
    server: dict[str, float | None] = {
        "memory": config.worker_memory,
        "cpu_seconds": config.worker_cpu_seconds,
        "nofile": config.worker_nofile,
    }
    limits: dict[str, float] = {}
    for name, value in server.items():
        asked = (requested or {}).get(name)
        chosen = [v for v in (value, asked) if v is not None]
        if chosen:
            limits[name] = min(chosen)
    return limits


class Cleanup:
    """The interface, doing nothing (in-process tests of the supervisor's
    logic); `GroupCleanup` and `CgroupCleanup` do the work."""

    mode = "none"
    #: memory.max enforces `memory` (else the worker's RLIMIT_AS does)
    memory_by_cgroup = False
    #: the supervisor, not the zygote, tells a carried task to go (after
    #: moving its child into place: `when_placed`)
    supervisor_go = False

    def __init__(self, census: Census = lambda: (set(), set())) -> None:
        self.census = census
        self.killed = 0  # processes killed that jobs had left behind

    def start(self, loop: EventLoop) -> None:
        """Before the first zygote starts."""

    def worker_limits(self, limits: dict[str, float]) -> dict[str, float]:
        """The limits a worker sets on itself (rlimits)."""
        if self.memory_by_cgroup:
            return {k: v for k, v in limits.items() if k != "memory"}
        return dict(limits)

    def zygote_started(self, pid: int) -> None:
        """A zygote process was just exec'd."""

    def child_forked(self, child: Child) -> None:
        """The zygote forked it: put it in its place before it runs a task."""
        if child.job is not None:
            self.limit(child, child.job.limits)

    def when_placed(self, child: Child, then: Callable[[], object]) -> None:
        """Call `then` once the child is where it may run a task: at once,
        unless it is still being moved into its cgroup."""
        then()

    def limit(self, child: Child, limits: dict[str, float]) -> None:
        """Its job's limits are known (forked for it, or taken from the pool)."""
        child.limits = dict(limits)

    def promoted(self, child: Child) -> None:
        """A worker becomes a zygote: it must survive its job's cleanup."""

    def child_exited(self, child: Child) -> None:
        """Its process is gone: kill what it left behind."""

    def sweep(self, stopping: bool = False) -> None:
        """Housekeeping, and after reaping processes of no job's."""

    def own(self) -> set[int]:
        """Our children that are cleanup's own (the watchdog)."""
        return set()

    def reaped(self, pid: int, stopping: bool) -> bool:
        """A child of ours was reaped: True if it was one of cleanup's own."""
        return False

    def stop(self) -> None:
        """The server stops: kill everything left."""

    def finished(self) -> bool:
        """True once nothing is left (asked again after reaping)."""
        return True

    def stats(self) -> dict[str, Any]:
        return {"cleanup": self.mode, "cleanup_killed": self.killed, "cgroup": None}


class GroupCleanup(Cleanup):
    """Without cgroups: process groups, and orphans swept."""

    mode = "process-group"

    def __init__(self, census: Census) -> None:
        super().__init__(census)
        # Orphans seen, with the workers running when they turned up: one
        # of those jobs left it, and it goes once all of them have ended.
        self.suspects: dict[int, set[int]] = {}

    def start(self, loop: EventLoop) -> None:
        log.info("per-job cleanup: process groups and orphan sweeps (no cgroup v2)")

    def child_exited(self, child: Child) -> None:
        # Its group id cannot be anyone else's while a member lives, and a
        # worker's pid is fresh (forked by a zygote); the group is its own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        self.sweep()

    def sweep(self, stopping: bool = False) -> None:
        """Kill the orphans no running job can still own (all when stopping)."""
        known, running = self.census()
        orphans = child_pids() - known
        for pid in list(self.suspects):
            if pid not in orphans:
                del self.suspects[pid]
        for pid in orphans:
            owners = self.suspects.setdefault(pid, set(running)) & running
            self.suspects[pid] = owners
            if stopping or not owners:
                log.info("killing process %d: left behind by a job that has ended", pid)
                kill_child(pid)
                self.killed += 1

    def stop(self) -> None:
        self.sweep(stopping=True)

    def finished(self) -> bool:
        self.sweep(stopping=True)
        return not self.suspects


class CgroupCleanup(Cleanup):
    mode = "cgroup"
    supervisor_go = True

    def __init__(self, census: Census, base: Path, server_id: str) -> None:
        super().__init__(census)
        self.root = Cgroup(base / f"zygote-{server_id}").create()
        self.zygotes = self.root.child("zygotes")
        self.memory_by_cgroup = self.root.enable_memory()
        self.numbers = 0
        self.busy: list[Cgroup] = []  # killed, not yet empty enough to remove
        self.watchdog: subprocess.Popen[bytes] | None = None
        self._watch_w = -1
        self.mover: Mover | None = None
        self.loop: EventLoop | None = None

    def start(self, loop: EventLoop) -> None:
        self.mover, self.loop = Mover(), loop
        loop.watch(self.mover.wake, self._moved)
        self._start_watchdog()
        memory = "memory.max" if self.memory_by_cgroup else "RLIMIT_AS (no memory controller)"
        log.info("per-job cleanup: cgroup v2 under %s; memory limits by %s", self.root.path, memory)
        if not cgroups.favors_dynmods():
            log.info(
                "cgroup v2 is mounted without favordynmods: each move into a job's cgroup "
                "waits for the kernel (spawns forked on demand measured 11 ms instead of 4; "
                "docs/cleanup-and-limits.md)"
            )

    def _start_watchdog(self) -> None:
        read, self._watch_w = os.pipe()
        try:
            script = watchdog.__file__
            argv = [sys.executable, "-I", "-S", script, str(read), str(self.root.path)]
            # Its own process group: a terminal's ^C is the supervisor's.
            self.watchdog = subprocess.Popen(argv, pass_fds=(read,), process_group=0)
        finally:
            os.close(read)

    def own(self) -> set[int]:
        return {self.watchdog.pid} if self.watchdog is not None else set()

    def reaped(self, pid: int, stopping: bool) -> bool:
        if self.watchdog is None or pid != self.watchdog.pid:
            return False
        self.watchdog.returncode = 0  # reaped by us, not by subprocess
        if self._watch_w >= 0:
            os.close(self._watch_w)
            self._watch_w = -1
        self.watchdog = None
        if not stopping:
            log.warning("the cgroup watchdog (pid %d) died; starting another", pid)
            self._start_watchdog()
        return True

    def zygote_started(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone: its exit says why
            self.zygotes.add(pid)

    def child_forked(self, child: Child) -> None:
        self.numbers += 1
        try:
            child.cgroup = self.root.child(f"w{self.numbers}")
        except OSError as exc:
            # It runs on unconfined rather than not at all; said loudly.
            log.error("worker %d: cannot make its cgroup: %s", child.pid, exc)
        else:
            if self.mover is not None:
                child.placing = []
                self.mover.move(child, child.cgroup)
            else:  # stopping (the thread is gone): moved here and now
                with contextlib.suppress(OSError):
                    child.cgroup.add(child.pid)
        super().child_forked(child)

    def when_placed(self, child: Child, then: Callable[[], object]) -> None:
        if child.placing is None:
            then()
        else:
            child.placing.append(then)

    def _moved(self) -> None:
        assert self.mover is not None
        for child, pid, cgroup, error in self.mover.finished():
            waiting, child.placing = child.placing, None
            if waiting is None:
                continue  # it exited before the move was done: released
            if isinstance(error, ProcessLookupError):
                continue  # it died already; its exit is on the way
            if error is not None:
                # It runs on unconfined rather than not at all; said loudly.
                log.error("worker %d: cannot move it into its cgroup %s: %s", pid, cgroup, error)
            for then in waiting:
                try:
                    then()
                except Exception:  # the other children must not wait for ever
                    log.exception("worker %d: after its move into its cgroup", pid)

    def limit(self, child: Child, limits: dict[str, float]) -> None:
        child.limits = dict(limits)
        if self.memory_by_cgroup and "memory" in limits and child.cgroup is not None:
            try:
                child.cgroup.limit_memory(int(limits["memory"]))
            except OSError as exc:
                log.error("worker %d: cannot set its memory limit: %s", child.pid, exc)

    def promoted(self, child: Child) -> None:
        # Out of its job's cgroup first, or that cgroup's end would kill it.
        self.zygote_started(child.pid)
        self._release(child)

    def child_exited(self, child: Child) -> None:
        # A move still under way finds the cgroup gone, or empties into it
        # and is killed with it; nothing waits for it any more.
        child.placing = None
        self._release(child)

    def _release(self, child: Child) -> None:
        cgroup, child.cgroup = child.cgroup, None
        if cgroup is None:
            return
        # The common case is one read and one rmdir: the worker is gone and
        # left nothing behind, so there is nothing to list or kill (this ran
        # for every job, and its walks and writes were a tenth of the
        # supervisor's time under load).
        if cgroup.populated():
            left = [pid for pid in cgroup.pids() if pid != child.pid]
            if left:
                self.killed += len(left)
                log.info(
                    "worker %d [%s] left %d processes behind; killing its cgroup",
                    child.pid,
                    child.name,
                    len(left),
                )
            with contextlib.suppress(FileNotFoundError):
                cgroup.kill()
        if self.memory_by_cgroup and cgroup.oom_kills():
            child.limit_hit = "memory"
        if not cgroup.remove():
            self.busy.append(cgroup)

    def sweep(self, stopping: bool = False) -> None:
        """Remove the cgroups that were still busy when killed."""
        self.busy = [cgroup for cgroup in self.busy if not cgroup.remove()]

    def stop(self) -> None:
        if self.mover is not None and self.loop is not None:
            self.loop.unwatch(self.mover.wake)
            self.mover.close()  # the moves asked for are done first
            self.mover = None
        with contextlib.suppress(FileNotFoundError):
            self.root.kill()

    def finished(self) -> bool:
        if self.root.populated():
            return False
        if not self.root.remove():
            return False
        if self._watch_w >= 0:
            os.close(self._watch_w)  # it finds the cgroup gone, and exits
            self._watch_w = -1
        return self.watchdog is None  # reaped (see `reaped`)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "cgroup": str(self.root.path)}


def make_cleanup(config: ServerConfig, server_id: str, census: Census) -> Cleanup:
    """Cgroups if allowed and possible, else process groups (said in the log)."""
    if config.cgroups:
        base, why = cgroups.writable_base()
        if base is not None:
            try:
                return CgroupCleanup(census, base, server_id)
            except OSError as exc:
                why = f"cannot make a cgroup under {base}: {exc}"
        log.warning("no per-job cgroups (%s): falling back to process groups", why)
    return GroupCleanup(census)
