"""A lineage: one profile's zygotes (a fleet, with its generations), its
ready pool and its queue. The default lineage preloads `--preload`; each
`--profile NAME=MODULES` adds one. Worker slots are shared by all. Part of
the supervisor process."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from .children import Job
from .fleet import Fleet
from .pool import ReadyPool


@dataclass(eq=False)
class Lineage:
    name: str
    fleet: Fleet
    pool: ReadyPool
    queue: collections.deque[Job] = field(default_factory=collections.deque)

    def stats(self) -> dict[str, Any]:
        return {
            **self.fleet.stats(),
            "pool_ready": len(self.pool.ready),
            "pool_starting": len(self.pool.starting),
            "pool_size": self.pool.size,
            "pool_taken": self.pool.taken,
            "queued": len(self.queue),
        }
