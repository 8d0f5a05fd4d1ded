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
import time
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

    def __init__(self, socket: zmq.Socket[bytes], wait_for_room: Callable[[float], None]) -> None:
        self.socket = socket
        # Returns once the socket has room for a message, or raises why it
        # will not (given when the send began to wait).
        self.wait_for_room = wait_for_room
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
        riding = bool(self.held) and self.max_batch > 1
        if riding:
            frames.insert(0, encode(Collected(self.held)))
        elif self.held:
            self.send_confirmations()
        for start in range(0, len(frames), self.max_batch):
            self.put(frames[start : start + self.max_batch])
            if riding:  # gone with the first message; kept if it could not go
                self.held, self.unproven, riding = [], self.last, False
        self.last = reqs[-1]
        return reqs

    def confirm(self, handle_id: str, big: bool = False) -> None:
        """The result of `handle_id` reached whoever wanted it: say so now,
        or, inside a map, with its next spawn (now if `big` or many wait)."""
        self.held.append(handle_id)
        if not self.maps or big or len(self.held) >= CONFIRM_BATCH:
            self.send_confirmations()

    def send_confirmations(self) -> None:
        if self.held:
            self.put([encode(Collected(self.held))])
            self.held, self.unproven = [], self.last

    def put(self, frames: list[bytes]) -> None:
        """Send one ZeroMQ message, waiting for room with `wait_for_room`.

        ZeroMQ's own wait has no bound: a DEALER waits for a connection to
        write to, and once a handshake is refused libzmq drops the
        connection for good (no reconnect after a protocol error). A send
        made after that, even by a split second, would wait for ever, and
        neither the client's timeout nor its handshake watch would get a
        turn to say why. So the first frame goes without waiting, and the
        client does the waiting in between.

        The other frames go as usual: they cannot have to wait. A DEALER
        writes all of a message to the connection its first frame went to,
        whose high-water mark counts whole messages, so there is room for
        the rest; and if that connection dies halfway, libzmq drops the
        whole message at once rather than wait (as a broken connection
        loses what it carried: the probes see to it). Sent without waiting,
        they could fail halfway and leave ZeroMQ dropping the next message.
        """
        more = zmq.SNDMORE if len(frames) > 1 else 0
        since: float | None = None
        while True:
            try:
                self.socket.send(frames[0], zmq.NOBLOCK | more)
                break
            except zmq.Again:
                since = time.monotonic() if since is None else since
                self.wait_for_room(since)
        for frame in frames[1:-1]:
            self.socket.send(frame, zmq.SNDMORE)
        if more:
            self.socket.send(frames[-1])

    def answered(self, req: int) -> None:
        """A reply to `req` came: replies come in order, so the server has
        read everything sent before it."""
        if self.unproven is not None and req > self.unproven:
            self.unproven = None
