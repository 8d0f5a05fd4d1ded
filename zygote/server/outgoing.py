"""What the supervisor sends its clients, gathered per client over one turn
of the event loop and sent as one ZeroMQ message of several frames, one
protocol message each. Part of the supervisor process.

Why: every ZeroMQ send from an idle pipe wakes the context's I/O thread,
and on the client's side its I/O thread and then its caller. With a
`map()` or several clients keeping workers busy, results, exits and
replies for the same client pile up within one turn of the loop; sent
together they cost one hand-over each way instead of one per message.
A lone reply costs nothing extra: the loop sends what it gathered before
it waits again.
"""

from __future__ import annotations

import logging

import zmq

from .store import Envelope

log = logging.getLogger("zygote.supervisor")

#: Frames at least this big are lent to ZeroMQ rather than copied: it keeps
#: a reference to the bytes until its I/O thread has sent them.
ZERO_COPY_MIN = 64 * 1024


class Outgoing:
    """Messages for clients, by client, until `flush()`."""

    def __init__(self, router: zmq.Socket[bytes]) -> None:
        self.router = router
        self._queued: dict[Envelope, list[bytes]] = {}
        self._holding: Envelope | None = None
        self.messages = 0  # counters for stats(): protocol messages sent
        self.sends = 0  # and the ZeroMQ messages they went in

    def send(self, envelope: Envelope, data: bytes) -> bool:
        """Queue `data` for the client at `envelope`. A REQ client (its
        envelope ends with the empty delimiter) takes one frame per reply:
        its reply goes at once. False if that send failed."""
        if len(envelope) != 1:
            return self._send(envelope, [data])
        self._queued.setdefault(envelope, []).append(data)
        return True

    def send_now(self, envelope: Envelope, data: bytes) -> bool:
        """Send `data`, and whatever was queued for that client before it,
        at once: for a reply whose client should not wait for the rest of
        the turn (a `Spawned` before its worker is woken). Not while that
        client's batch is being read: its replies go together after it."""
        if envelope == self._holding or len(envelope) != 1:
            return self.send(envelope, data)
        return self._send(envelope, [*self._queued.pop(envelope, []), data])

    def hold(self, envelope: Envelope | None) -> None:
        """Queue even `send_now`s to this client (None: to nobody)."""
        self._holding = envelope

    def flush(self) -> None:
        """Send everything queued: one ZeroMQ message per client."""
        while self._queued:
            envelope, frames = self._queued.popitem()
            self._send(envelope, frames)

    def _send(self, envelope: Envelope, frames: list[bytes]) -> bool:
        """Without blocking; False if the client is gone or not reading (the
        message is dropped: its probe asks again for what it waits on)."""
        router = self.router
        try:
            # ROUTER_MANDATORY: an unknown or full peer fails on the first
            # frame, before anything of the message is queued.
            for part in envelope:
                router.send(part, zmq.NOBLOCK | zmq.SNDMORE)
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                flags = zmq.NOBLOCK if i == last else zmq.NOBLOCK | zmq.SNDMORE
                router.send(frame, flags, copy=len(frame) < ZERO_COPY_MIN)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
            log.debug("could not reach a client: %s", exc)
            return False
        self.messages += len(frames)
        self.sends += 1
        return True
