"""What the supervisor tells clients about its jobs (`zygote jobs`). No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .children import Job
from .store import Record


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
