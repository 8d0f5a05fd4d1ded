"""Background functions: what `@zygote.background` returns, and how workers
send to them.

A background function runs in the helper process (zygote/helper.py), in a
thread of its own, so that the zygote keeps no thread. Workers reach it with
`.send(obj)`: the object is packed with msgpack and written, without ever
blocking, to a datagram socket pair the zygote made — its receiving end is
the helper's, its sending end is inherited by every worker. A datagram
socket pair keeps each message whole and each sender's messages in order,
and holds what is sent while the helper restarts (the zygote keeps the
receiving end open).

What the socket cannot take right now waits in a small buffer of the
worker's own, tried again on the next send and flushed (bounded) before the
worker exits; what does not fit there is dropped and counted on an eventfd
the supervisor reads.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import inspect
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgpack

__all__ = ["Background", "Outbox", "background"]

R = TypeVar("R")

#: Every background function registered by the preload, by name.
REGISTRY: dict[str, Background[Any]] = {}

#: A worker keeps at most this much unsent, then drops (and counts).
PENDING_MESSAGES, PENDING_BYTES = 10_000, 4 << 20
#: The socket's send buffer asked for (the kernel caps it at
#: net.core.wmem_max, 208 KiB by default): all workers share it, and a small
#: message takes about 1 KiB of it in flight. A message may take half of
#: what was granted, at most 2 MiB.
SEND_BUFFER = 4 << 20
MAX_MESSAGE = 2 << 20


class Background(Generic[R]):
    """A function that runs in the helper process; `.send()` feeds its inbox.

    Calling the object calls the function here, in this process (for tests
    of your own)."""

    def __init__(self, func: Callable[..., R], name: str) -> None:
        self.func = func
        self.name = name
        self.takes_inbox = _parameters(func) >= 1

    def send(self, obj: Any) -> bool:
        """Deliver `obj` (msgpack-able) to the function's inbox in the helper,
        without blocking. False if it had to be dropped (counted by the
        server). Raises TypeError for an object msgpack cannot pack,
        ValueError for one too big to send, RuntimeError outside a zygote."""
        if not self.takes_inbox:
            raise TypeError(f"background function {self.name} takes no inbox to send to")
        return OUTBOX.send(self.name, obj)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<background function {self.name}>"


def background(
    func: Callable[..., R] | None = None, *, name: str | None = None
) -> Background[R] | Callable[[Callable[..., R]], Background[R]]:
    """Run `func` in the helper process, in a thread of its own, instead of
    in the zygote. A function taking one parameter is given its inbox, an
    iterable of what workers `.send()`. Use it as ``@zygote.background`` or
    ``@zygote.background(name="flusher")`` (by default "module:function")."""

    def register(f: Callable[..., R]) -> Background[R]:
        module = getattr(f, "__module__", None) or "?"
        bg = Background(f, name or f"{module}:{getattr(f, '__qualname__', repr(f))}")
        REGISTRY[bg.name] = bg
        return bg

    return register(func) if func is not None else register


def _parameters(func: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


class Outbox:
    """The sending end in this process (a worker, the zygote, the helper).
    Safe to use from several threads of one process."""

    def __init__(self) -> None:
        self.fd: int | None = None  # the pair's sending end, once attached
        self.drops_fd: int | None = None  # an eventfd counting drops
        self.max_message = 0  # what one datagram can carry here
        self._sock: socket.socket | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        # A thread of the zygote inside send() at a fork would leave the
        # child this lock held.
        os.register_at_fork(after_in_child=self._lock._at_fork_reinit)  # type: ignore[attr-defined]

    def attach(self, fd: int, drops_fd: int, max_message: int) -> None:
        # A worker promoted to zygote (a refork) attaches its own helper's:
        # the old generation's, which it inherited, are closed first.
        if self._sock is not None:
            self._sock.close()
        for old in {self.fd, self.drops_fd} - {None, fd, drops_fd}:
            assert old is not None
            os.close(old)
        self.fd, self.drops_fd, self.max_message = fd, drops_fd, max_message
        self._sock = socket.socket(fileno=os.dup(fd))  # closing it keeps `fd`
        self._pending.clear()
        self._pending_bytes = 0

    def send(self, name: str, obj: Any) -> bool:
        data = msgpack.packb([name, obj], use_bin_type=True)
        if self.fd is None:
            raise RuntimeError(
                f"cannot send to background function {name}: this process is not a "
                "zygote's worker (no helper to send to)"
            )
        if len(data) > self.max_message:
            raise ValueError(
                f"a message of {len(data)} bytes is too big for a background inbox "
                f"(at most {self.max_message} here)"
            )
        with self._lock:
            if self._pending:
                self._flush_pending()
            if not self._pending:
                sent = self._send_now(data)
                if sent is not None:
                    return sent
            if (
                len(self._pending) >= PENDING_MESSAGES
                or self._pending_bytes + len(data) > PENDING_BYTES
            ):
                self.count_dropped(1)
                return False
            self._pending.append(data)
            self._pending_bytes += len(data)
            return True

    def flush(self, timeout: float) -> None:
        """Send what waits, for at most `timeout` seconds; drop the rest."""
        with self._lock:
            if not self._pending or self.fd is None:
                return
            deadline = time.monotonic() + timeout
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            while self._pending:
                self._flush_pending()
                remaining = deadline - time.monotonic()
                if not self._pending or remaining <= 0:
                    break
                poller.poll(max(1, int(remaining * 1000)))
            if self._pending:
                self.count_dropped(len(self._pending))
                self._pending.clear()
                self._pending_bytes = 0

    def _flush_pending(self) -> None:
        while self._pending and self._send_now(self._pending[0]) is not None:
            self._pending_bytes -= len(self._pending.popleft())

    def _send_now(self, data: bytes) -> bool | None:
        """True if sent, None if the socket is full (try again later), False
        if dropped (and counted): the helper is gone for good (its zygote
        retired: ECONNREFUSED, then ENOTCONN for everyone sharing the
        socket), or the kernel will not take this datagram."""
        assert self._sock is not None
        try:
            self._sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self.count_dropped(1)
            return False
        return True

    def count_dropped(self, count: int) -> None:
        """Add to the server's count of dropped messages."""
        if self.drops_fd is not None:
            # It fails only if the counter is full (2**64 - 2): we tried.
            with contextlib.suppress(OSError):
                os.eventfd_write(self.drops_fd, count)


_GONE = {errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.EMSGSIZE, errno.ENOBUFS}


#: This process's sending end.
OUTBOX = Outbox()
