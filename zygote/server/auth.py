"""Who may talk to the supervisor: CURVE on its socket, and the ZAP handler
that admits only the public keys in `--curve-clients`. Part of the
supervisor process, served by its one loop like any other socket.

libzmq asks the ZAP handler (a REP socket on a fixed inproc address of the
same context) about every new connection, from its I/O thread, and holds
the handshake until the answer comes: an answer takes one turn of the loop.
The key admitted becomes the connection's User-Id, which every message
carries (`owner_of`): on tcp a job belongs to the key that spawned it.
"""

from __future__ import annotations

import logging

import zmq
import zmq.utils.z85

from ..keys import load_public_dir, load_secret

log = logging.getLogger("zygote.supervisor")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class CurveAuth:
    """CURVE for the ROUTER socket; `clients_dir` holds the keys let in."""

    def __init__(self, secret_file: str, clients_dir: str) -> None:
        self.public, self.secret = load_secret(secret_file)
        self.clients_dir = clients_dir
        self.clients = load_public_dir(clients_dir)
        self.refused = 0
        self._refused_logged: set[bytes] = set()

    def start(self, context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        """Bind the ZAP handler; watch the returned socket, calling `on_zap`."""
        self.zap = context.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        return self.zap

    def secure(self, router: zmq.Socket[bytes]) -> None:
        """Make `router` a CURVE server (before it binds)."""
        router.curve_server = True
        router.curve_secretkey = self.secret
        router.curve_publickey = self.public
        router.zap_domain = b"zygote"

    def on_zap(self) -> None:
        """Answer the ZAP requests that have arrived (RFC 27)."""
        while True:
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.zap.send_multipart(self._answer(request))

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:  # not from libzmq: nothing sensible to answer
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism, *credentials = request
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unknown ZAP version", b"", b""]
        if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32:
            key = zmq.utils.z85.encode(credentials[0])
            name = self.clients.get(key)
            if name is not None:
                return [b"1.0", request_id, b"200", b"OK", key, b""]
            if key not in self._refused_logged and len(self._refused_logged) < 1024:
                self._refused_logged.add(key)
                log.warning(
                    "refused a client from %s: its key %s is not in %s",
                    address.decode(errors="replace"),
                    key.decode(),
                    self.clients_dir,
                )
        self.refused += 1
        return [b"1.0", request_id, b"400", b"key not authorized", b"", b""]


def owner_of(frame: zmq.Frame) -> str | None:
    """The key (z85) a message came with, or None without CURVE."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return str(user) if user else None


def not_allowed(task: str, patterns: list[str] | None, explicit: bool) -> str:
    """Why a spawn of `task` is refused, naming the option that decides."""
    if explicit:
        return (
            f"task {task!r} is not allowed on this server: it runs only tasks matching "
            f"--allow-task ({', '.join(patterns or [])})"
        )
    modules = sorted({p.split(":")[0] for p in patterns or [] if not p.endswith(".*:*")})
    return (
        f"task {task!r} is not allowed on this server: on tcp it runs only the tasks of "
        f"its preloaded modules ({', '.join(modules) or 'none'}); allow others with "
        "--allow-task PATTERN"
    )
