"""A lineage: one profile's zygotes (a fleet, with its generations), its
ready pool and its queue. The default lineage preloads `--preload`; each
`--profile NAME=MODULES` adds one. Worker slots are shared by all. Part of
the supervisor process."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from ..linux import helper_threads
from .children import Job
from .fleet import Fleet
from .memory import Readings, lineage_memory
from .pool import ReadyPool


@dataclass(eq=False)
class Lineage:
    name: str
    fleet: Fleet
    pool: ReadyPool
    queue: collections.deque[Job] = field(default_factory=collections.deque)

    def stats(self, readings: Readings | None = None) -> dict[str, Any]:
        """This lineage's part of `zygote status`; its zygote's memory from
        `readings` (the memory reader's)."""
        fleet = self.fleet
        zygote = fleet.current
        return {
            "generation": zygote.generation if zygote else None,
            "zygote_pid": zygote.pid if zygote else None,
            "zygote_state": zygote.state.value if zygote else None,
            "incoming_generation": fleet.incoming.generation if fleet.incoming else None,
            "reload_pending": fleet.reload_pending,  # asked for during a refork
            "threads": zygote.threads if zygote else [],
            "zygote_restarts": fleet.restarts,
            "zygotes_retired_corrupt": fleet.retired_corrupt,
            "helper_pid": zygote.helper_pid if zygote else None,
            "helper_threads": helper_threads(zygote.helper_pid) if zygote else [],
            "helper_restarts": zygote.helper_restarts if zygote else 0,
            "background_dropped": fleet.drops.total,
            "promoted_from": zygote.promoted_from if zygote else None,
            "generation_spawns": zygote.spawns if zygote else 0,
            "reforks": fleet.policy.reforks,
            "refork_failures": fleet.policy.failures,
            "refork_refused": dict(fleet.refused),
            "refork_requested": fleet.policy.requested,
            "pool_ready": len(self.pool.ready),
            "pool_starting": len(self.pool.starting),
            "pool_size": self.pool.size,
            "pool_taken": self.pool.taken,
            "queued": len(self.queue),
            **lineage_memory(readings or {}, zygote),
        }
