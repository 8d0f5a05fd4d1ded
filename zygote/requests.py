"""The sending half of the Python client's socket: request ids, batches as
big as the server takes, and, inside a `map()`, confirmations held back to
ride with its next spawn (docs/protocol.md, sections 1 and 7).

Why hold confirmations back: a `Collected` sent alone is one more ZeroMQ
message per job, and each wakes the I/O threads on both sides and the
server's loop. Sent as the first frame of the next request's message, it
costs a frame. Only a `map()` is sure to send again; a plain `spawn()`'s
result is confirmed at once: held back, it would stay on the server for as
long as the caller sends nothing (an RQ worker idle for an hour, say).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import zmq

from .codec import encode
from .protocol import Collected, Message

#: Inside a map, confirmations are held back until its next spawn, until
#: this many wait, or sent at once for a result this big (the server keeps
#: each result until it hears).
CONFIRM_BATCH = 64
CONFIRM_AT_ONCE = 64 * 1024


class Requests:
    """Numbers and sends requests on a DEALER socket."""

    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self.socket = socket
        self._ids = itertools.count(1)
        self.last = 0  # the id of the last request sent
        self.max_batch = 1  # requests per ZeroMQ message: the server's max_batch
        self.held: list[str] = []  # handles whose results we took, not yet confirmed
        self.maps = 0  # > 0 while a map() takes a result: its confirmation waits
        # Confirmations went out after request `unproven`, and no reply to a
        # later request has proved the server read them yet.
        self.unproven: int | None = None

    def send(self, makes: list[Callable[[int], Message]]) -> list[int]:
        """Send a request per `make(req)`, the held confirmations first, in
        as few ZeroMQ messages as the server takes; their ids."""
        reqs = [next(self._ids) for _ in makes]
        frames = [encode(make(req)) for make, req in zip(makes, reqs, strict=True)]
        if self.held and self.max_batch > 1:
            frames.insert(0, encode(Collected(self.held)))
            self.held, self.unproven = [], self.last
        elif self.held:
            self.send_confirmations()
        self.last = reqs[-1]
        if len(frames) == 1:
            self.socket.send(frames[0])
        else:
            for start in range(0, len(frames), self.max_batch):
                self.socket.send_multipart(frames[start : start + self.max_batch])
        return reqs

    def confirm(self, handle_id: str, big: bool = False) -> None:
        """The result of `handle_id` reached whoever wanted it: say so now,
        or, inside a map, with its next spawn (now if `big` or many wait)."""
        self.held.append(handle_id)
        if not self.maps or big or len(self.held) >= CONFIRM_BATCH:
            self.send_confirmations()

    def send_confirmations(self) -> None:
        if self.held:
            self.socket.send(encode(Collected(self.held)))
            self.held, self.unproven = [], self.last

    def answered(self, req: int) -> None:
        """A reply to `req` came: replies come in order, so the server has
        read everything sent before it."""
        if self.unproven is not None and req > self.unproven:
            self.unproven = None
