"""CURVE keys for tcp endpoints: making them (`zygote keygen`), reading
them, and telling a client why a handshake failed. The files are pyzmq's
`zmq.auth` certificates: `NAME.key` holds the public key, `NAME.key_secret`
the public and the secret one.

Imported by the client and the supervisor only (it needs zmq; the zygote
and its workers must never load it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.utils.monitor import recv_monitor_message

from .config import ConfigError
from .errors import ServerUnavailable, ZygoteError

__all__ = [
    "ClientKeys",
    "HandshakeWatch",
    "Handshakes",
    "generate",
    "load_public",
    "load_public_dir",
    "load_secret",
]


def generate(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write `NAME.key` and `NAME.key_secret` into `directory` (made 0700 if
    new), both 0600; refuses to overwrite a key."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"a key name is a plain file name, not {name!r}")
    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path} exists: not overwriting a key")
    # The umask, not a chmod afterwards: a secret must never be readable by
    # others, not even for the moment between writing and changing its mode.
    umask = os.umask(0o077)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(umask)
    for path in (public, secret):
        path.chmod(0o600)
    return public, secret


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file; ConfigError if it is not one
    or if other users can read it."""
    try:
        mode = os.stat(path).st_mode
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the secret key {path}: {exc}") from None
    if secret is None:
        raise ConfigError(f"{path} holds no secret key (a NAME.key_secret file is needed)")
    _check_key(public, path)
    _check_key(secret, path)
    if mode & 0o077:
        raise ConfigError(
            f"the secret key {path} is readable by other users (mode {mode & 0o777:o}): "
            f"chmod 600 {path}"
        )
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The public key in a `.key` (or `.key_secret`) file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the public key {path}: {exc}") from None
    return _check_key(public, path)


def _check_key(key: bytes, path: str | os.PathLike[str]) -> bytes:
    """A CURVE key is 40 characters of Z85 for 32 bytes; anything else only
    fails later, inside libzmq, as a bare 'Invalid argument'."""
    try:
        valid = len(key) == 40 and len(zmq.utils.z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ConfigError(f"{path} does not hold a CURVE key (make one with `zygote keygen`)")
    return key


def load_public_dir(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """Every `*.key` in `directory`: public key (z85) -> the file's name."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"--curve-clients {folder} is not a directory of public keys")
    info = folder.stat()
    if info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o022:
        # Whoever can write there can let themselves in at the next start.
        raise ConfigError(
            f"--curve-clients {folder} must belong to us (or root) and be writable by "
            f"nobody else (owner uid {info.st_uid}, mode {info.st_mode & 0o777:o})"
        )
    keys = {load_public(path): path.stem for path in sorted(folder.glob("*.key"))}
    if not keys:
        raise ConfigError(f"no NAME.key in --curve-clients {folder}: nobody could connect")
    return keys


class ClientKeys:
    """A client's CURVE settings, from arguments or `$ZYGOTE_CURVE_SECRET` and
    `$ZYGOTE_CURVE_SERVER`."""

    def __init__(self, secret: str | None, server: str | None) -> None:
        secret = secret or os.environ.get("ZYGOTE_CURVE_SECRET") or None
        server = server or os.environ.get("ZYGOTE_CURVE_SERVER") or None
        if bool(secret) != bool(server):
            raise ConfigError(
                "CURVE needs both the client's secret key (curve_secret=, $ZYGOTE_CURVE_SECRET) "
                "and the server's public key (curve_server=, $ZYGOTE_CURVE_SERVER)"
            )
        self.enabled = secret is not None
        if secret is not None and server is not None:
            self.public, self.secret = load_secret(os.path.expanduser(secret))
            self.server = load_public(os.path.expanduser(server))

    @classmethod
    def for_client(cls, secret: str | None, server: str | None) -> ClientKeys:
        """The keys a client was given; a bad setting is a ZygoteError."""
        try:
            return cls(secret, server)
        except ConfigError as exc:
            raise ZygoteError(str(exc)) from None

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Set them on a socket before it connects."""
        if self.enabled:
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
            sock.curve_serverkey = self.server

    def explain(self, event: int, value: int, endpoint: str) -> tuple[str, bool] | None:
        """Why a handshake failed (a socket monitor event), in words, and
        whether that is certain; None for events that are not a failure.
        A connection closed mid-handshake (NO_DETAIL) is also what a proxy
        with no server behind it looks like: a hint, not a verdict."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = (
                f"authentication failed: the server at {endpoint} refused our key "
                "(its public key must be in the server's --curve-clients directory)"
            )
            return why, True
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
            if self.enabled:
                why = (
                    f"authentication failed: the server at {endpoint} does not use CURVE "
                    "(was it started with --insecure?)"
                )
            else:
                why = (
                    f"authentication failed: the server at {endpoint} requires CURVE keys "
                    "(curve_secret= and curve_server=, or $ZYGOTE_CURVE_SECRET and "
                    "$ZYGOTE_CURVE_SERVER)"
                )
            return why, True
        if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            # A server that hangs up on a client without keys sometimes
            # resets the connection before its greeting is read: then this,
            # not the mismatch, is all a client sees.
            if self.enabled:
                hint = "is curve_server / $ZYGOTE_CURVE_SERVER that server's public key?"
            else:
                hint = (
                    "does it require CURVE keys: curve_secret= and curve_server=, or "
                    "$ZYGOTE_CURVE_SECRET and $ZYGOTE_CURVE_SERVER?"
                )
            why = (
                f"authentication failed, or no zygote server at {endpoint}: the handshake "
                f"keeps failing ({hint})"
            )
            return why, False
        return None


#: The ZMTP error a handshake between CURVE and no CURVE ends with.
_MECHANISM_MISMATCH = 0x11000002
#: Uncertain handshake failures in a row that end a wait (ServerUnavailable).
_FAILURES_IN_A_ROW = 3


class Handshakes:
    """Follows a client's handshakes: a refused key fails at once
    (ZygoteError); a handshake broken off with no reason given, only once
    it happened a few times in a row (ServerUnavailable). A success clears it."""

    def __init__(self, keys: ClientKeys, endpoint: str) -> None:
        self.keys, self.endpoint = keys, endpoint
        self.error: ZygoteError | None = None
        self._in_a_row = 0

    def saw(self, event: int, value: int) -> ZygoteError | None:
        """Take one monitor event; the error that now stands, if any."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.error, self._in_a_row = None, 0
        elif (verdict := self.keys.explain(event, value, self.endpoint)) is not None:
            why, certain = verdict
            self._in_a_row += 1
            if certain:
                self.error = ZygoteError(why)
            elif self._in_a_row >= _FAILURES_IN_A_ROW:
                self.error = ServerUnavailable(why)
        return self.error


#: Handshake outcomes a client watches for on tcp.
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class HandshakeWatch:
    """Polls a client's socket, and on tcp its handshakes too (`Handshakes`):
    a failed one raises its error, from then until one succeeds."""

    def __init__(self, sock: zmq.Socket[bytes], keys: ClientKeys, endpoint: str) -> None:
        self.sock = sock
        self.handshakes = Handshakes(keys, endpoint)
        self.monitor: zmq.Socket[bytes] | None = None
        self.pollers: dict[int, zmq.Poller] = {}  # by what we wait for: POLLIN, POLLOUT
        if endpoint.startswith("tcp://"):
            self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
            for event in (zmq.POLLIN, zmq.POLLOUT):
                poller = self.pollers[event] = zmq.Poller()
                poller.register(sock, event)
                poller.register(self.monitor, zmq.POLLIN)

    def poll(self, timeout_ms: int, event: int = zmq.POLLIN) -> bool:
        """Wait for a message (or, for POLLOUT, room to send one); True if
        there is."""
        if self.monitor is None:
            return bool(self.sock.poll(timeout_ms, event))
        self._check()
        ready = dict(self.pollers[event].poll(timeout_ms))
        self._check()
        return self.sock in ready

    def wait_for_room(self, until: float) -> bool:
        """Wait for room to send a message, until the monotonic time `until`;
        True once there is."""
        while (left := until - time.monotonic()) > 0:
            if self.poll(max(1, int(left * 1000)), zmq.POLLOUT):
                return True
        return False

    def _check(self) -> None:
        assert self.monitor is not None
        error = self.handshakes.error
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            error = self.handshakes.saw(event["event"], event["value"])
        if error is not None:
            raise error

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
