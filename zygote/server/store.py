"""What the supervisor keeps per handle until a client has it. No I/O.

A record is made when a spawn is accepted. The worker's `Result` and
`Exited` messages land in it, already encoded, and are pushed to every
client following the handle (the spawner, plus any that attached later).
A successful send is not proof of delivery: ZeroMQ accepts a message for
a client that is closing its socket at that moment and then throws it
away. So a result counts as delivered only once a client confirms it
(`Collected`). A record goes away once its result is collected and the
process has ended; an uncollected result stays for `ttl` seconds, and at
most `max_kept` of them, `max_bytes` in all, are kept (oldest dropped
first). Every drop is reported to the caller, which logs it: nothing
disappears silently.
"""

from __future__ import annotations

import collections
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

#: How many ended jobs' handles are remembered (with how they ended).
_ENDED_KEPT = 65536

#: ZeroMQ routing frames that address one client connection.
Envelope = tuple[bytes, ...]

#: The output of a job kept for clients that attach later (both streams).
TAIL_BYTES = 64 * 1024


@dataclass(eq=False)
class JobOutput:
    """The last TAIL_BYTES a job's task wrote, and how much it wrote."""

    #: (stream, offset of its first byte in the job's output, data), oldest first
    tail: collections.deque[tuple[str, int, bytes]] = field(default_factory=collections.deque)
    kept: int = 0
    offset: int = 0  # bytes written so far, both streams

    def keep(self, stream: str, data: bytes) -> None:
        self.tail.append((stream, self.offset, data))
        self.offset += len(data)
        self.kept += len(data)
        while self.kept - len(self.tail[0][2]) >= TAIL_BYTES:
            self.kept -= len(self.tail.popleft()[2])
        if self.kept > TAIL_BYTES:  # the oldest piece, cut to fit
            name, offset, first = self.tail[0]
            cut = self.kept - TAIL_BYTES
            self.tail[0] = (name, offset + cut, first[cut:])
            self.kept = TAIL_BYTES


@dataclass(eq=False)
class Record:
    handle: str
    task: str
    #: the key (z85) of the client that spawned it, on a CURVE endpoint: only
    #: that key's clients see the job
    owner: str | None = None
    pid: int = 0
    generation: int = 0
    warnings: list[str] = field(default_factory=list)
    ready: bool = False
    #: encoded Result / Exited messages, once known
    result: bytes | None = None
    exited: bytes | None = None
    #: queued for the followers at least once (sent again only on request,
    #: which a client that missed it makes when it probes)
    result_sent: bool = False
    exit_sent: bool = False
    #: a client confirmed it has the result
    collected: bool = False
    finished_at: float | None = None
    #: clients to push Result and Exited to (an ordered set)
    followers: dict[Envelope, None] = field(default_factory=dict)
    #: (client, request id) pairs still owed a Spawned reply
    waiting: list[tuple[Envelope, int]] = field(default_factory=list)
    #: when it was accepted, and when its worker got the task (the store's clock)
    accepted: float = 0.0
    started: float | None = None
    #: what its task wrote, the last TAIL_BYTES of it (output.py)
    output: JobOutput = field(default_factory=JobOutput)

    @property
    def size(self) -> int:
        """Bytes it holds: its result and its kept output."""
        return len(self.result or b"") + self.output.kept

    @property
    def done(self) -> bool:
        # The exit report is pushed on a best-effort basis: once a client has
        # the result, the record is not kept just for it.
        return self.collected and self.exited is not None


class ResultStore:
    def __init__(
        self,
        ttl: float,
        max_kept: int,
        max_bytes: int = 1 << 62,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_kept = max_kept
        self.max_bytes = max_bytes
        self._clock = clock
        self._records: dict[str, Record] = {}
        # Finished records whose result no client has confirmed, oldest
        # first, with the size of each result; and their total.
        self._uncollected: OrderedDict[str, int] = OrderedDict()
        self.uncollected_bytes = 0
        # How the latest records ended, by handle: a job is never started
        # twice under one name, even when its request is sent again after
        # the record is gone.
        self._ended: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def uncollected(self) -> int:
        return len(self._uncollected)

    def open(
        self, handle: str, task: str, client: Envelope, req: int, owner: str | None = None
    ) -> Record:
        record = Record(handle, task, owner, accepted=self._clock())
        record.followers[client] = None
        record.waiting.append((client, req))
        self._records[handle] = record
        return record

    def get(self, handle: str) -> Record | None:
        return self._records.get(handle)

    def ended(self, handle: str, owner: str | None = None) -> str | None:
        """How the job `handle` of `owner` ended, if its record is gone (and recent)."""
        why, whose = self._ended.get(handle, (None, None))
        return why if whose == owner else None

    def discard(self, handle: str, why: str) -> None:
        record = self._records.pop(handle, None)
        if record is not None:
            self._ended[handle] = (why, record.owner)
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
        self._unfile(handle)

    def settle(self, record: Record) -> list[Record]:
        """File a record after a delivery attempt; returns records dropped to
        respect `max_kept` and `max_bytes` (the caller logs them)."""
        handle = record.handle
        if self._records.get(handle) is not record:  # dropped already (TTL, bound)
            return []
        if record.done:
            self.discard(handle, "its result was collected")
            return []
        if record.collected:
            self._unfile(handle)
            return []  # awaiting its exit report, owed to nobody
        if record.result is None or handle in self._uncollected:
            return []  # still running, or filed already
        record.finished_at = self._clock()
        self._uncollected[handle] = record.size
        self.uncollected_bytes += record.size
        dropped = []
        # The newest result stays even alone over `max_bytes`: a result
        # within the message limit always gets its chance to be collected.
        while len(self._uncollected) > 1 and (
            len(self._uncollected) > self.max_kept or self.uncollected_bytes > self.max_bytes
        ):
            oldest = next(iter(self._uncollected))
            dropped.append(self._records[oldest])
            self.discard(oldest, "its result was dropped uncollected: too many kept")
        return dropped

    def expire(self) -> list[Record]:
        """Drop results no client has taken within the TTL; returns their records."""
        deadline = self._clock() - self.ttl
        expired = []
        while self._uncollected:
            handle = next(iter(self._uncollected))
            record = self._records.get(handle)
            if record is not None and record.finished_at is not None:
                if record.finished_at > deadline:
                    break
                expired.append(record)
            self.discard(handle, "its result expired uncollected")
        return expired

    def _unfile(self, handle: str) -> None:
        self.uncollected_bytes -= self._uncollected.pop(handle, 0)
