"""What workers write to their stdout and stderr, on the supervisor's side.

Each child's descriptors 1 and 2 are pipes whose read ends the zygote hands
over with the fork (`zygote/child/capture.py`). The tracker reads them as
they turn readable (`Capture`); the hub (`OutputHub`) pushes each piece to
the clients following the child's job as an `Output` message and keeps the
last `TAIL_BYTES` with the job's record, for a client that attaches later.

What nobody takes goes to the server's log, line by line, tagged with the
job (or the pool child): output of a job nobody follows any longer, of a
child before it has a job, and of a worker after its result. At most
`LOG_BYTES` per child are logged, then one line says how much was not.

Ordering: the worker flushes its Python streams before it writes its
result, and the tracker reads the pipes dry before it hands the result on,
so a job's output reaches each client before its `result`.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..codec import encode
from ..protocol import STDERR, STDOUT, Output
from .lifecycle import ChildState

if TYPE_CHECKING:
    from .children import Child
    from .store import Envelope, Record

log = logging.getLogger("zygote.output")

#: Output logged per child when nobody takes it; the rest is counted.
LOG_BYTES = 64 * 1024
_READ_CHUNK = 1 << 16
#: How much one readable event reads before the loop serves others.
_READ_BUDGET = 1 << 20


@dataclass(eq=False)
class Capture:
    """The read ends of one child's stdout and stderr pipes, and what of
    its output went to the log."""

    fds: dict[str, int]
    #: a line begun and not yet ended, per stream (logged whole)
    partial: dict[str, bytearray] = field(default_factory=dict)
    logged: int = 0
    not_logged: int = 0

    @classmethod
    def of(cls, out_fd: int, err_fd: int) -> Capture:
        for fd in (out_fd, err_fd):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        return cls({STDOUT: out_fd, STDERR: err_fd})

    def read(self, stream: str, budget: int = _READ_BUDGET) -> tuple[bytes, bool]:
        """What is waiting on `stream` (up to `budget`), and whether its
        write ends are all closed."""
        fd = self.fds.get(stream)
        if fd is None:
            return b"", True
        chunks: list[bytes] = []
        size = 0
        while size < budget:
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                return b"".join(chunks), True
            if not data:
                return b"".join(chunks), True
            chunks.append(data)
            size += len(data)
        return b"".join(chunks), False

    def close(self, stream: str) -> None:
        fd = self.fds.pop(stream, None)
        if fd is not None:
            os.close(fd)


class OutputHub:
    """Routes output pieces: to a job's followers, else to the log."""

    def __init__(
        self,
        record: Callable[[str], Record | None],
        send: Callable[[Envelope, bytes], bool],
    ) -> None:
        self._record = record
        self._send = send

    def received(self, child: Child, stream: str, data: bytes) -> None:
        """`data` came from `child`'s `stream`."""
        job = child.job
        record = None
        # A job's output is what its worker writes while it runs its task.
        if job is not None and child.state is ChildState.RUNNING:
            record = self._record(job.handle)
        if record is None or record.result is not None:
            self._log(child, stream, data)
            return
        message = encode(Output(record.handle, stream, data, record.output.offset))
        record.output.keep(stream, data)
        if not any([self._send(target, message) for target in record.followers]):
            self._log(child, stream, data)

    def replay(self, record: Record, target: Envelope) -> None:
        """Send a client that attaches what is kept of the job's output."""
        for stream, offset, data in record.output.tail:
            self._send(target, encode(Output(record.handle, stream, data, offset)))

    def closed(self, child: Child, stream: str) -> None:
        """`child`'s `stream` ended: log a line it left unfinished, and how
        much was not logged."""
        capture = child.output
        if capture is None:
            return
        rest = capture.partial.pop(stream, None)
        if rest:
            self._line(child, stream, bytes(rest))
        if capture.not_logged and not capture.fds:
            log.info(
                "[%s] ... %d more bytes of output not logged", _name(child), capture.not_logged
            )
            capture.not_logged = 0

    def _log(self, child: Child, stream: str, data: bytes) -> None:
        capture = child.output
        if capture is None:
            return
        room = LOG_BYTES - capture.logged
        if room <= 0:
            capture.not_logged += len(data)
            return
        if len(data) > room:
            capture.not_logged += len(data) - room
            data = data[:room]
        capture.logged += len(data)
        pending = capture.partial.setdefault(stream, bytearray())
        pending += data
        *lines, rest = pending.split(b"\n")
        capture.partial[stream] = bytearray(rest)
        for line in lines:
            self._line(child, stream, bytes(line))

    def _line(self, child: Child, stream: str, line: bytes) -> None:
        log.info("[%s] %s: %s", _name(child), stream, line.decode(errors="replace").rstrip("\r"))


def _name(child: Child) -> str:
    """A job's handle, or a child's name (pool:N) before it has a job."""
    return child.job.handle if child.job is not None else child.name
