"""The supervisor's listening socket: the ZeroMQ ROUTER, its options, binding
it, and leaving no socket file behind. Part of the supervisor process."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import zmq

from ..config import ConfigError, ensure_private_dir, runtime_dir

log = logging.getLogger("zygote.supervisor")

#: Rejected client messages are logged at most once per peer per interval.
REJECT_LOG_INTERVAL = 10.0
_REJECT_PEERS_KEPT = 1024


def listen(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str, max_message: int
) -> zmq.Socket[bytes]:
    """A ROUTER socket bound to `endpoint` (its actual address in
    `LAST_ENDPOINT`); ConfigError if that cannot be done."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Clients name themselves (a stable routing id): one that reconnects
    # keeps its name and still gets the replies and results meant for it.
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)
    router.setsockopt(zmq.LINGER, 2000)
    # libzmq drops (and disconnects) anything bigger; between the two
    # limits a client gets a clear "too large" reply instead.
    router.setsockopt(zmq.MAXMSGSIZE, 2 * max_message + 65536)
    try:
        _bind(router, endpoint)
    except BaseException:
        router.close()
        raise
    return router


def _bind(router: zmq.Socket[bytes], endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        parent = Path(os.path.dirname(path) or ".")
        if parent == runtime_dir() or not parent.is_dir():
            ensure_private_dir(parent)
        if os.path.exists(path) and _unix_socket_alive(path):
            raise ConfigError(f"another server is already listening on {endpoint}")
    try:
        router.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot listen on {endpoint}: {exc}") from None


def remove(endpoint: str) -> None:
    """After closing: libzmq leaves an ipc socket file behind, and clients
    take a file there for a server."""
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint[len("ipc://") :])


def _unix_socket_alive(path: str) -> bool:
    """True if something accepts connections on the unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


class Rejections:
    """Client messages rejected as malformed: all counted, logged at most
    once per peer per interval — a client sending garbage in a loop must
    not flood the log (10,000 bad frames once gave 9,200 lines). The ones
    not logged are reported as a count when the interval is up."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.count = 0
        # Per peer: (rejections not yet logged, when it was last logged).
        self._peers: collections.OrderedDict[bytes, tuple[int, float]] = collections.OrderedDict()

    def add(self, peer: bytes, what: str) -> None:
        self.count += 1
        now = self.clock()
        unlogged, logged = self._peers.pop(peer, (0, -REJECT_LOG_INTERVAL))
        if now - logged >= REJECT_LOG_INTERVAL:
            more = f" (and {unlogged} more since the last report)" if unlogged else ""
            log.warning("rejected a message from client %s: %s%s", peer.hex()[:16], what, more)
            unlogged, logged = 0, now
        else:
            unlogged += 1
        self._peers[peer] = (unlogged, logged)
        while len(self._peers) > _REJECT_PEERS_KEPT:
            self._peers.popitem(last=False)

    def report(self) -> None:
        """Log the counts of those not logged, once their interval is up."""
        now = self.clock()
        for peer, (unlogged, logged) in list(self._peers.items()):
            if now - logged < REJECT_LOG_INTERVAL:
                continue
            if unlogged:
                log.warning(
                    "rejected %d more messages from client %s in the last %.0f s",
                    unlogged,
                    peer.hex()[:16],
                    now - logged,
                )
            del self._peers[peer]
