"""A client's sends once libzmq has dropped its connection, against
scripted ZMTP listeners (real sockets, a handshake that fails at will).

After a handshake ends in a protocol error (a refused mechanism, a command
it does not know), libzmq never reconnects, and a DEALER with no connection
has no room for a message: ZeroMQ's blocking send would wait for ever."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import zmq

import zygote.aio
import zygote.client
import zygote.requests
from zygote import Zygote
from zygote.errors import ServerUnavailable, ZygoteError, ZygoteTimeout

from .conftest import wait_until


def _zmtp_greeting(mechanism: bytes, as_server: bool) -> bytes:
    """A ZMTP 3.0 greeting (rfc.zeromq.org/spec/23)."""
    return (
        b"\xff"
        + bytes(8)
        + b"\x7f\x03\x00"
        + mechanism.ljust(20, b"\0")
        + bytes([as_server])
        + bytes(31)
    )


#: What a CURVE server says first: a client without keys hangs up on it.
_CURVE_GREETING = _zmtp_greeting(b"CURVE", True)
#: A NULL handshake broken off by a command it does not know: libzmq hangs
#: up, with no reason a client could be sure of (keys.Handshakes).
_BROKEN_HANDSHAKE = _zmtp_greeting(b"NULL", False) + b"\x04\x06\x05HELLO"


@dataclass
class Greeter:
    """A tcp endpoint that greets each client with `greeting` once `greet`
    is set, and says no more. After a handshake that fails so, libzmq never
    reconnects: the client's socket has no connection left."""

    endpoint: str
    greet: threading.Event
    greeting: bytes = _CURVE_GREETING


@pytest.fixture
def greeter() -> Iterator[Greeter]:
    listener = socket.create_server(("127.0.0.1", 0))
    greeter = Greeter(f"tcp://127.0.0.1:{listener.getsockname()[1]}", threading.Event())
    connections: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):  # until the listener is shut
            while True:
                connection, _ = listener.accept()
                connections.append(connection)
                greeter.greet.wait()
                connection.sendall(greeter.greeting)

    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    try:
        yield greeter
    finally:
        greeter.greet.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        serving.join(10)
        listener.close()
        for connection in connections:
            connection.close()


def _dropped(sock: zmq.Socket[bytes]) -> bool:
    """Whether libzmq has dropped a client's connection: a DEALER without one
    has no room for a message (and polling makes the socket hear of it)."""
    return not sock.poll(0, zmq.POLLOUT)


def test_a_send_after_the_connection_was_dropped_is_told_not_stuck(
    greeter: Greeter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ZeroMQ's blocking send waits for a connection for ever, and after a
    # refused handshake there is none: CI once hung in the constructor's
    # first send, its thread held up between connect() and send() for as
    # long as the handshake took to fail.
    says = "authentication failed: .* requires CURVE keys"
    with Zygote(greeter.endpoint, timeout=60) as z:  # its Ping waits for the greeting
        _spawn_fails_after_the_drop(z, greeter, ZygoteError, says, within=5)

    async def asynchronously() -> None:  # its sends never block the loop
        client = zygote.aio.Zygote(greeter.endpoint, timeout=60)
        try:
            sync = zmq.Socket.shadow(client._socket.underlying)
            wait_until(lambda: _dropped(sync), 10, "libzmq to drop the connection")
            began = time.monotonic()
            with pytest.raises(ZygoteError, match=says):
                await client.ping()
            assert time.monotonic() - began < 5
        finally:
            await client.close()

    asyncio.run(asynchronously())

    # The constructor's own first send, made only once the connection is
    # gone (where in CI the scheduler got in the way).
    dropped: list[float] = []

    class Late(zygote.requests.Requests):
        def __init__(self, sock: zmq.Socket[bytes], *args: Any) -> None:
            wait_until(lambda: _dropped(sock), 10, "libzmq to drop the connection")
            dropped.append(time.monotonic())
            super().__init__(sock, *args)

    monkeypatch.setattr(zygote.client, "Requests", Late)
    with pytest.raises(ZygoteError, match=says):
        Zygote(greeter.endpoint, timeout=60)
    assert time.monotonic() - dropped[0] < 5


@pytest.mark.parametrize(
    ("timeout", "error", "says"),
    [
        (1.0, ZygoteTimeout, "took no message within 1s"),
        (None, ServerUnavailable, "no server answered"),  # as a silent one
    ],
)
def test_a_send_with_no_connection_and_no_reason_gives_up_in_time(
    greeter: Greeter,
    monkeypatch: pytest.MonkeyPatch,
    timeout: float | None,
    error: type[ZygoteError],
    says: str,
) -> None:
    if timeout is None:  # the probes' timing shortened as in test_client.py
        monkeypatch.setattr(zygote.client, "PROBE_EVERY", 0.2)
        monkeypatch.setattr(zygote.client, "PROBE_TIMEOUT", 0.5)
    greeter.greeting = _BROKEN_HANDSHAKE  # one failure, not a verdict
    with Zygote(greeter.endpoint, timeout=timeout) as z:
        _spawn_fails_after_the_drop(z, greeter, error, says, within=3)


def _spawn_fails_after_the_drop(
    z: Zygote, greeter: Greeter, error: type[ZygoteError], says: str, within: float
) -> None:
    """Let the listener greet, wait for libzmq to drop the connection, then
    spawn: it must raise `error` within `within` seconds, not hang."""
    greeter.greet.set()
    wait_until(lambda: _dropped(z._socket), 10, "libzmq to drop the connection")
    began = time.monotonic()
    with pytest.raises(error, match=says):
        z.spawn("tests.tasks:add", 1, 2)
    assert time.monotonic() - began < within
