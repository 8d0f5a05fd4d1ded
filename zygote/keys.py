"""CURVE keys for tcp endpoints: making them (`zygote keygen`), reading
them, and telling a client why a handshake failed. The files are pyzmq's
`zmq.auth` certificates: `NAME.key` holds the public key, `NAME.key_secret`
the public and the secret one.

Imported by the client and the supervisor only (it needs zmq; the zygote
and its workers must never load it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from .config import ConfigError
from .errors import ZygoteError

__all__ = [
    "ClientKeys",
    "HandshakeWatch",
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
    return public


def load_public_dir(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """Every `*.key` in `directory`: public key (z85) -> the file's name."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"--curve-clients {folder} is not a directory of public keys")
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

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Set them on a socket before it connects."""
        if self.enabled:
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
            sock.curve_serverkey = self.server

    def explain(self, event: int, endpoint: str) -> str | None:
        """Why a handshake failure (a socket monitor event) happened, in words;
        None for events that are not one."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (
                f"authentication failed: the server at {endpoint} refused our key "
                "(its public key must be in the server's --curve-clients directory)"
            )
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self.enabled:
            return (
                f"authentication failed: the CURVE handshake with {endpoint} failed "
                "(is curve_server / $ZYGOTE_CURVE_SERVER that server's public key?)"
            )
        if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            if self.enabled:
                return (
                    f"authentication failed: the server at {endpoint} does not use CURVE "
                    "(was it started with --insecure?)"
                )
            return (
                f"authentication failed: the server at {endpoint} requires CURVE keys "
                "(curve_secret= and curve_server=, or $ZYGOTE_CURVE_SECRET and "
                "$ZYGOTE_CURVE_SERVER)"
            )
        return None


#: Handshake outcomes a client watches for on tcp.
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class HandshakeWatch:
    """Polls a client's socket, and on tcp its handshakes too: a refused
    one raises ZygoteError saying why, from then until one succeeds."""

    def __init__(self, sock: zmq.Socket[bytes], keys: ClientKeys, endpoint: str) -> None:
        self.sock, self.keys, self.endpoint = sock, keys, endpoint
        self.failure: str | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        if endpoint.startswith("tcp://"):
            self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
            self.poller = zmq.Poller()
            self.poller.register(sock, zmq.POLLIN)
            self.poller.register(self.monitor, zmq.POLLIN)

    def poll(self, timeout_ms: int) -> bool:
        """Wait for a message; True if one is there."""
        if self.monitor is None:
            return bool(self.sock.poll(timeout_ms))
        self._check()
        ready = dict(self.poller.poll(timeout_ms))
        self._check()
        return self.sock in ready

    def _check(self) -> None:
        assert self.monitor is not None
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failure = None
            else:
                self.failure = self.keys.explain(event, self.endpoint) or self.failure
        if self.failure is not None:
            raise ZygoteError(self.failure)

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
