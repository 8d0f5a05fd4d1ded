"""Built-in validators: cheap probes of the locks a fork most often corrupts.

Each runs in a new child, after the after-fork hooks and before the child
reports ready, under the supervisor's deadline. A lock that a zygote thread
held at fork time is held forever in the child: a probe either finds it held
at once (`acquire(blocking=False)` fails) and raises, or blocks on it and is
killed at the deadline; either way the child is replaced.

They run only in children forked while the zygote had other threads: with
none, nothing can have been left locked, and the child is spared their cost.
They reduce the risk, they cannot remove it: a probe takes some of a
library's locks, not all of them. Per-task timeouts catch the rest, and the
thread inventory says which thread to move out of the zygote.

Heavy modules are imported inside the probes: the zygote imports this
module whatever the application uses, and must not load OpenSSL for it.
"""

from __future__ import annotations

import logging
import select
import socket
import sys
from collections.abc import Callable


def openssl() -> None:
    """OpenSSL's shared state: the random generator, and a new SSL context,
    whose creation fetches ciphers and digests through the provider store
    and name map (the locks behind `CRYPTO_THREAD_write_lock` hangs).

    Measured (benchmarks.fork_hazard --variants, 2000 forks each): the SSL
    context caught 5 of 8 hangs; random bytes plus a digest fetch caught
    none of 10. The context is most of this probe's ~0.6 ms; it is only
    paid in children of a zygote that has threads."""
    import ssl

    ssl.RAND_bytes(16)
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def logging_handlers() -> None:
    """Logging can be used: the module's lock and every handler's lock can
    be taken, and every handler's stream flushed.

    The stream is where logging hangs after a fork: Python re-creates the
    handler locks in the child, but not the lock inside a handler's
    `BufferedWriter`, which a thread writing a record holds. The fork guards
    keep threads out of handlers at the fork and the child gets fresh
    streams, so this probe finds what got past them (a guard that timed
    out, a stream that could not be replaced): a flush that blocks is
    caught by the deadline."""
    locks = [("the logging module lock", logging._lock)]  # type: ignore[attr-defined]
    streams = []
    for ref in list(logging._handlerList):  # type: ignore[attr-defined]
        handler = ref()
        if handler is None:
            continue
        if handler.lock is not None:
            locks.append((f"the lock of {handler!r}", handler.lock))
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "flush"):
            streams.append(stream)
    for what, lock in locks:
        if not lock.acquire(blocking=False):
            raise RuntimeError(f"{what} is held: a thread of the zygote held it at fork time")
        lock.release()
    for stream in streams:
        stream.flush()  # blocks on a buffer lock left held by a vanished thread


def stdio() -> None:
    """stdout and stderr can be flushed (their buffer locks are free) and
    their descriptors take a write without blocking."""
    poller = select.poll()
    names = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            continue
        stream.flush()  # blocks on a buffer lock left held by a vanished thread
        try:
            fd = stream.fileno()
        except (OSError, ValueError, AttributeError):  # replaced by an in-memory stream
            continue
        poller.register(fd, select.POLLOUT)
        names[fd] = name
    writable = {fd for fd, events in poller.poll(0) if events & select.POLLOUT}
    for fd, name in names.items():
        if fd not in writable:
            raise RuntimeError(f"{name} (fd {fd}) would block: is anything reading it?")


def resolver() -> None:
    """The C library's name resolution (NSS and resolver locks)."""
    socket.getaddrinfo("localhost", None)


def builtin() -> dict[str, Callable[[], None]]:
    """The built-in probes that apply to this process, by name. The OpenSSL
    probe applies only once OpenSSL is loaded: otherwise no thread can hold
    its locks, and loading it just to probe would cost every zygote."""
    probes: dict[str, Callable[[], None]] = {}
    if _loaded("libcrypto"):
        probes["openssl"] = openssl
    probes["logging"] = logging_handlers
    probes["stdio"] = stdio
    probes["resolver"] = resolver
    return probes


#: Probes with lazy set-up (loading OpenSSL's tables, NSS modules) that the
#: zygote runs once itself, so that children do not each pay for it.
WARM_UP = frozenset({"openssl", "resolver"})


def _loaded(library: str) -> bool:
    with open("/proc/self/maps") as maps:
        return any(library in line for line in maps)
