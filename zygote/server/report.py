"""What the supervisor tells clients about itself (`stats`, `ping`) and
about its jobs (`zygote jobs`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..protocol import DEFAULT_PROFILE
from .children import Job
from .endpoint import MAX_BATCH
from .store import Record

if TYPE_CHECKING:
    from .supervisor import Supervisor


def identity(sup: Supervisor) -> dict[str, Any]:
    """Who answers, and its limits: the reply to a ping."""
    return {
        "server": sup.server_id,
        "pid": os.getpid(),
        "version": __version__,
        "max_workers": sup.config.max_workers,
        "max_message_bytes": sup.config.max_message_bytes,
        # Requests one ZeroMQ message may carry, one per frame (protocol.md).
        "max_batch": MAX_BATCH,
    }


def server_stats(sup: Supervisor) -> dict[str, Any]:
    """A snapshot of the server for `Zygote.stats()` and `zygote status`."""
    memory = sup.memory.readings()
    profiles = {name: lin.stats(memory) for name, lin in sup.spawner.lineages.items()}
    return {
        **identity(sup),
        "endpoint": sup.endpoint,
        "uptime": time.monotonic() - sup.started,
        "state": "stopping" if sup.stopping else "running",
        **profiles[DEFAULT_PROFILE],  # as before profiles
        **sup.spawner.stats(),
        "profiles": profiles,
        "memory": sup.memory.report(memory, sup.tracker.children.values(), profiles),
        "metrics": sup.metrics,
        "queue_size": sup.config.queue_size,
        "results_kept": sup.store.uncollected,
        "results_kept_bytes": sup.store.uncollected_bytes,
        "busy_rejections": sup.busy_rejections,
        "rejected_messages": sup.listener.rejections.count,
        # Protocol messages and the ZeroMQ messages they came and went in.
        "client_traffic": {
            "received": sup.listener.requests,
            "received_in": sup.listener.receives,
            "sent": sup.outgoing.messages,
            "sent_in": sup.outgoing.sends,
        },
        "internal_errors": sup.loop.internal_errors,
        **sup.cleanup.stats(),
    }


def job_list(
    jobs: Iterable[Job], records: Mapping[str, Record], owner: str | None, now: float
) -> list[dict[str, Any]]:
    """The queued and running jobs `owner` may see (on a CURVE endpoint, its
    key's own; else all), oldest first."""
    listing = []
    for job in jobs:
        record = records.get(job.handle)
        if record is None or record.owner != owner:
            continue
        started = record.started
        listing.append(
            {
                "id": job.handle,
                "task": job.spawn.task,
                "state": job.state.value,
                "pid": record.pid or None,
                "profile": job.profile,
                "generation": record.generation or None,
                "waited": round((started or now) - record.accepted, 3),
                "runtime": None if started is None else round(now - started, 3),
            }
        )
    return sorted(listing, key=lambda entry: -entry["waited"] - (entry["runtime"] or 0))
