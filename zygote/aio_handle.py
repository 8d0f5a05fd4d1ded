"""The asyncio client's `Handle`: one spawned job, awaited (`zygote.aio`)."""

from __future__ import annotations

import asyncio
import signal as _signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ServerUnavailable, ZygoteError, ZygoteTimeout
from .handle import Delivery, ExitInfo, _outcome
from .protocol import Exited, Kill, Output, Result

if TYPE_CHECKING:
    from .aio import Zygote


@dataclass(eq=False)
class _Job(Delivery):
    """What the server pushed for one job, and who waits for it."""

    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, msg: Result | Exited | Output) -> None:
        super().take(msg)
        self.changed.set()

    async def until(self, done: Any) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()


class Handle:
    """One spawned job (from `await Zygote.spawn()` or `attach()`)."""

    def __init__(self, client: Zygote, id: str, pid: int, generation: int, warnings: list[str]):
        self.id, self.pid, self.generation, self.warnings = id, pid, generation, warnings
        self._client = client
        self._job = client._job(id, pid)

    def __repr__(self) -> str:
        state = "done" if self._job.result is not None else "running"
        return f"<aio.Handle {self.id} pid={self.pid} generation={self.generation} {state}>"

    def done(self) -> bool:
        """True once the result is known (never waits)."""
        return self._job.result is not None

    async def result(self, timeout: float | None = None) -> Any:
        """The task's return value; raises TaskError, WorkerLost, TaskTimeout,
        or ZygoteTimeout if `timeout` seconds pass first."""
        job = self._job
        await self._client._wait(job.until(lambda: job.result is not None), timeout, self.id)
        assert job.result is not None
        await self._client._confirm(self.id, job)
        return _outcome(job.result)

    async def wait(self, timeout: float | None = None) -> ExitInfo:
        """Wait for the worker process to end; its exit status and usage."""
        job = self._job
        await self._client._wait(job.until(lambda: job.exited is not None), timeout, self.id)
        e = job.exited
        assert e is not None
        if job.result is not None:
            await self._client._confirm(self.id, job)
        return ExitInfo(
            e.pid, e.exit_code, e.signal, e.description, e.duration, e.utime, e.stime, e.maxrss_kb
        )

    async def output(self, timeout: float | None = None) -> AsyncIterator[tuple[str, bytes]]:
        """What the task writes, as it comes (`async for stream, data in
        h.output()`): `zygote.Handle.output()`'s pieces, until the result."""
        job = self._job
        job.reading = True  # see zygote.Handle.output
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            while (piece := job.next_output()) is not None:
                yield piece
            if job.result is not None:
                return
            left = None if deadline is None else max(0.0, deadline - loop.time())
            ready = job.until(lambda: bool(job.output) or job.result is not None)
            await self._client._wait(ready, left, self.id)

    async def kill(self, signal: int = _signal.SIGTERM) -> bool:
        """Send `signal` to the worker; False if it is no longer running."""
        try:
            await self._client._call(lambda req: Kill(req, self.id, int(signal)))
        except (ZygoteTimeout, ServerUnavailable):
            raise
        except ZygoteError:  # the server's answer: no running worker
            return False
        return True
