"""The supervisor's listening socket: the ZeroMQ ROUTER, its options and
security, binding it where nobody else can take it over, reading it (and
writing it through `outgoing.Outgoing`), and leaving no socket file behind.
Part of the supervisor process."""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import zmq

from ..config import ConfigError, ServerConfig, ensure_private_dir, runtime_dir
from .auth import CurveAuth, owner_of
from .loop import EventLoop
from .outgoing import Outgoing
from .store import Envelope

log = logging.getLogger("zygote.supervisor")

#: Rejected client messages are logged at most once per peer per interval.
REJECT_LOG_INTERVAL = 10.0
_REJECT_PEERS_KEPT = 1024
#: Requests one client message may carry, one per frame: a `map()` sends its
#: window of spawns, and a confirmation rides with the next request.
MAX_BATCH = 256


class Listener:
    """The socket clients talk to: bound safely, secured with CURVE when
    keys are configured, read in batches with each message's key."""

    def __init__(self, config: ServerConfig, rejections: Rejections) -> None:
        self.config = config
        self.rejections = rejections
        self.auth: CurveAuth | None = None
        self._socket_file: SocketFile | None = None
        self.requests = 0  # counters for stats(): requests received
        self.receives = 0  # and the ZeroMQ messages they came in

    def open(self, context: zmq.Context[zmq.Socket[bytes]], loop: EventLoop) -> zmq.Socket[bytes]:
        """Bind the ROUTER (and the ZAP handler first, if CURVE); ConfigError
        if that cannot be done safely."""
        config = self.config
        secure = None
        if config.curve_secret and config.curve_clients:
            self.auth = CurveAuth(config.curve_secret, config.curve_clients)
            loop.watch(self.auth.start(context), self.auth.on_zap)
            secure = self.auth.secure
        self.router, self._socket_file = listen(
            context, config.endpoint, config.max_message_bytes, secure
        )
        self.address = str(self.router.getsockopt_string(zmq.LAST_ENDPOINT))
        self.outgoing = Outgoing(self.router)  # what goes back to clients
        if self.auth is not None:
            log.info(
                "CURVE on %s: %d client keys from %s",
                self.address,
                len(self.auth.clients),
                self.auth.clients_dir,
            )
        elif self.address.startswith("tcp://"):
            warn_insecure(self.address)
        if self.address.startswith("tcp://") and not config.allow_tasks:
            modules = sorted({m for mods in config.lineages().values() for m in mods})
            # A library among them (numpy: savetxt writes files) gives clients
            # more than its name suggests: say so, once, where operators look.
            log.warning(
                "clients may run any function of the preloaded modules and their "
                "submodules (%s); narrow that with --allow-task",
                ", ".join(modules) or "none: no task at all",
            )
        return self.router

    def receive(self) -> Iterator[tuple[Envelope, bytes, str | None]]:
        """The requests waiting (from at most 1000 messages, then the loop's
        other sources get a turn): routing frames, body, and the key it came
        with. A message may carry up to MAX_BATCH, one per frame."""
        owner = None
        for _ in range(1000):
            try:
                if self.auth is None:
                    frames = self.router.recv_multipart(zmq.NOBLOCK)
                else:  # the key is on the frames, not in the bytes
                    parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    owner = owner_of(parts[-1])
                    frames = [part.bytes for part in parts]
            except zmq.Again:
                return
            self.receives += 1
            # REQ clients send [id, b"", body]; DEALER clients [id, body, ...],
            # a batch of requests in one message (an empty body is no request).
            envelope: Envelope
            if len(frames) >= 3 and not frames[1]:
                if len(frames) > 3:  # its socket could never read the answers
                    self.rejections.add(frames[0], "a REQ-style message with several requests")
                    continue
                envelope, bodies = (frames[0], b""), frames[2:]
            elif 2 <= len(frames) <= MAX_BATCH + 1:
                envelope, bodies = (frames[0],), frames[1:]
            else:
                self.rejections.add(
                    frames[0], f"a {len(frames)}-frame message: 1 to {MAX_BATCH} requests expected"
                )
                continue
            self.requests += len(bodies)
            # A batch's replies go together, once all of it has been read.
            self.outgoing.hold(envelope if len(bodies) > 1 else None)
            for body in bodies:
                yield envelope, body, owner
            self.outgoing.hold(None)

    def close(self) -> None:
        self.router.close()
        if self.auth is not None:
            self.auth.zap.close()

    def remove(self) -> None:
        """After the context is gone: our ipc socket file, if still ours."""
        remove(self.address, self._socket_file)


#: An ipc socket file, by (device, inode): the one we bound, and no other.
SocketFile = tuple[int, int]


def listen(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    max_message: int,
    secure: Callable[[zmq.Socket[bytes]], None] | None = None,
) -> tuple[zmq.Socket[bytes], SocketFile | None]:
    """A ROUTER socket bound to `endpoint` (its actual address in
    `LAST_ENDPOINT`), `secure`d before it binds, and for ipc the socket file
    it made; ConfigError if that cannot be done safely."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Clients name themselves (a stable routing id): one that reconnects
    # keeps its name and still gets the replies and results meant for it.
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)
    router.setsockopt(zmq.LINGER, 2000)
    # libzmq drops (and disconnects) anything bigger; between the two
    # limits a client gets a clear "too large" reply instead.
    router.setsockopt(zmq.MAXMSGSIZE, 2 * max_message + 65536)
    if secure is not None:
        secure(router)
    try:
        return router, _bind_safely(router, endpoint)
    except BaseException:
        router.close()
        raise


def _bind_safely(router: zmq.Socket[bytes], endpoint: str) -> SocketFile | None:
    """Bind `router` (after its security options are set); for ipc, in a
    directory only we can write to, as a socket file only we can open."""
    if not endpoint.startswith("ipc://"):
        _bind(router, endpoint)
        return None
    path = endpoint[len("ipc://") :]
    parent = Path(os.path.dirname(path) or ".")
    if parent == runtime_dir() or not os.path.lexists(parent):
        ensure_private_dir(parent)
    else:
        check_socket_dir(parent, path)
    if os.path.exists(path) and _unix_socket_alive(path):
        raise ConfigError(f"another server is already listening on {endpoint}")
    # bind() makes the file with the process umask (0 gives srwxrwxrwx: any
    # user could connect and run code as us). libzmq binds ipc in the calling
    # thread, and our only other thread (its I/O thread) makes no files.
    umask = os.umask(0o077)
    try:
        _bind(router, endpoint)
    finally:
        os.umask(umask)
    os.chmod(path, 0o600)  # 0700 from the umask; nobody executes a socket
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def check_socket_dir(parent: Path, path: str) -> None:
    """A custom ipc endpoint's directory: a real directory (not a symlink,
    which its owner could point elsewhere), ours or root's, and writable by
    nobody else, or sticky like /tmp with the socket's name not another
    user's. In a directory others may write to (or whose owner is another
    user), they can delete our socket and bind an impostor that receives
    every client's arguments."""
    info = parent.lstat()
    me = os.getuid()
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(
            f"cannot listen in {parent}: it is a symlink, which its owner can repoint; "
            "name the real directory"
        )
    if info.st_uid not in (me, 0):
        raise ConfigError(
            f"cannot listen in {parent}: it belongs to uid {info.st_uid}, not to us ({me}) "
            "or root; use a directory of your own (or the default endpoint)"
        )
    if info.st_mode & stat.S_ISVTX:
        with contextlib.suppress(FileNotFoundError):
            owner = os.lstat(path).st_uid
            if owner != me:
                raise ConfigError(
                    f"{path} belongs to uid {owner}, not to us ({me}): in the shared "
                    f"directory {parent}, pick another name or a private directory"
                )
        return
    if info.st_mode & 0o022:
        raise ConfigError(
            f"cannot listen in {parent}: other users can write to it (mode "
            f"{info.st_mode & 0o7777:o}) and so replace the socket with their own; "
            "use a directory only you can write to (or the default endpoint)"
        )


def _bind(router: zmq.Socket[bytes], endpoint: str) -> None:
    try:
        router.bind(endpoint)
    except zmq.ZMQError as exc:
        why = str(exc)
        if endpoint.startswith("tcp://"):  # libzmq's own words for these mislead
            host = endpoint.removeprefix("tcp://").rpartition(":")[0]
            why = {
                errno.ENODEV: f"no address or network interface {host!r} on this machine",
                errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
                errno.EADDRINUSE: "the address is in use (another server?)",
            }.get(exc.errno or 0, why)
        raise ConfigError(f"cannot listen on {endpoint}: {why}") from None


def remove(endpoint: str, ours: SocketFile | None) -> None:
    """After closing: libzmq leaves an ipc socket file behind, and clients
    take a file there for a server. Only our own file: another server may
    have taken the name since (a later start over a stale-looking socket)."""
    if not endpoint.startswith("ipc://") or ours is None:
        return
    path = endpoint[len("ipc://") :]
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == ours:
            os.unlink(path)
        else:
            log.info("left %s in place: it is another server's socket now", path)


def warn_insecure(address: str) -> None:
    """Say it loudly: a tcp endpoint without CURVE runs anyone's code."""
    host = address[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "INSECURE: %s has no authentication (--insecure): every local user can run "
            "code as this user (uid %d)",
            address,
            os.getuid(),
        )
    else:
        log.critical(
            "INSECURE: %s has no authentication or encryption (--insecure) and is open to "
            "the network: ANYONE WHO REACHES IT CAN RUN CODE AS THIS USER (uid %d). "
            "Use CURVE keys (zygote keygen; --curve-secret, --curve-clients)",
            address,
            os.getuid(),
        )


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
