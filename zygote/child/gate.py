"""The fork gate: threads pass it shared on their way into OpenSSL and the
resolver (and in `prevent_fork()` sections); a fork takes it exclusive, so no
thread is inside them at the instant of the fork.

OpenSSL 3 keeps its provider store, name map and random generator behind
process-wide locks, and the C library's resolver has its own; a thread
inside at fork time leaves the child a lock held forever. Only what takes
such locks is gated: context creation and certificate loading, handshakes,
digest and HMAC construction, key derivation, name resolution. Reads and
writes on an established TLS connection are not: a thread blocked for
seconds in `recv` on a slow peer must not stall forks.

`install()` runs in the zygote before any preload module, so the wrappers
are what libraries bind (`from hashlib import sha256` included). Modules not
imported yet are wrapped when they are: loading OpenSSL just to wrap it
would cost every zygote ~17 ms, and the OpenSSL probe every threaded child.
Outside a zygote, and in its children, the gate is inactive: a wrapper
costs one attribute test.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from threading import get_ident
from time import monotonic
from typing import Any

__all__ = ["GATE", "ForkGate", "install"]


class _Visit:
    __slots__ = ("depth", "since", "stuck", "what")

    def __init__(self, what: str, since: float) -> None:
        self.what = what
        self.since = since
        self.depth = 1
        self.stuck = False  # a fork gave up waiting for it


class ForkGate:
    """A shared/exclusive gate: threads pass it shared, the fork takes it
    exclusive, and once a fork waits, new visitors wait for it (so a busy
    thread cannot starve the fork).

    Re-entrant per thread: `SSLContext.wrap_socket` re-enters through
    `do_handshake`, and a visitor that had to wait there for a fork that
    waits for it would deadlock both.
    """

    def __init__(self) -> None:
        #: False outside a zygote (and in its children): passing is free
        self.active = False
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._inside: dict[int, _Visit] = {}  # thread ident -> its visit
        self._closer: int | None = None  # the thread closing it for a fork

    @contextlib.contextmanager
    def passing(self, what: str) -> Iterator[None]:
        """Hold the fork off while the block runs (from any thread)."""
        self.enter(what)
        try:
            yield
        finally:
            self.leave()

    # enter() and leave() are on the path of every gated call a thread of
    # the zygote makes: the plain lock, not the condition's context manager
    # (measured: 1.6 us a gated call instead of 2.3).
    def enter(self, what: str) -> None:
        me = get_ident()
        self._lock.acquire()
        try:
            visit = self._inside.get(me)
            if visit is not None:
                visit.depth += 1
                return
            while self._closer is not None and self._closer != me:
                self._cond.wait()
            self._inside[me] = _Visit(what, monotonic())
        finally:
            self._lock.release()

    def leave(self) -> None:
        me = get_ident()
        self._lock.acquire()
        try:
            visit = self._inside[me]
            visit.depth -= 1
            if not visit.depth:
                del self._inside[me]
                if self._closer is not None:
                    self._cond.notify_all()
        finally:
            self._lock.release()

    def close(self, timeout: float) -> bool:
        """Keep new visitors out and wait up to `timeout` for those inside to
        leave; True if they did. Closed either way: `open()` must follow.

        A visitor a fork already gave up waiting for (a handshake with a peer
        that never answers) is not waited for again: it would cost every
        later fork the same wait. It is still inside: see `visitors()`."""
        me = get_ident()
        deadline = monotonic() + timeout
        with self._cond:
            self._closer = me
            while any(i != me and not v.stuck for i, v in self._inside.items()):
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def give_up_on_visitors(self) -> None:
        """Call when a fork stops waiting: those inside now are stuck."""
        with self._cond:
            for visit in self._inside.values():
                visit.stuck = True

    def open(self) -> None:
        with self._cond:
            self._closer = None
            self._cond.notify_all()

    def visitors(self) -> list[str]:
        """Who is inside, in words that stay the same while they stay."""
        with self._cond:
            inside = [(i, v) for i, v in self._inside.items() if i != self._closer]
        return [f"{thread_name(ident)} in {visit.what}" for ident, visit in inside]

    def reset_in_child(self) -> None:
        """In a new child: the visitors were threads that do not exist here."""
        self._reset()
        self.active = False


#: The one gate of this process; `install()` activates it in the zygote.
GATE = ForkGate()


class GatedFunction:
    """A module-level function behind the gate.

    An object rather than a function: a function stored on a class becomes
    a method (Django's password hashers do ``digest = hashlib.sha256`` and
    call ``self.digest()``), and this must stay what it wraps was, a plain
    callable. It pickles by reference to where it is installed."""

    def __init__(self, func: Callable[..., Any], module: str, name: str) -> None:
        self.__wrapped__ = func
        self.what = f"{module}.{name}"
        self.__module__ = module
        self.__name__ = self.__qualname__ = name
        self.__doc__ = getattr(func, "__doc__", None)
        _ORIGINALS[self] = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not GATE.active:
            return self.__wrapped__(*args, **kwargs)
        GATE.enter(self.what)
        try:
            return self.__wrapped__(*args, **kwargs)
        finally:
            GATE.leave()

    def __reduce__(self) -> str:
        return self.__qualname__

    def __repr__(self) -> str:
        return f"<gated {self.__wrapped__!r}>"


def _gate_function(module: Any, name: str) -> None:
    """Put `module.name` behind the gate."""
    setattr(module, name, GatedFunction(getattr(module, name), module.__name__, name))


def _gated_method(func: Callable[..., Any], what: str) -> Callable[..., Any]:
    """A method (or `__new__`) behind the gate: a function, so that it binds."""

    @functools.wraps(func)
    def gated(*args: Any, **kwargs: Any) -> Any:
        if not GATE.active:
            return func(*args, **kwargs)
        GATE.enter(what)
        try:
            return func(*args, **kwargs)
        finally:
            GATE.leave()

    return gated


#: gated wrapper -> what it wraps (hmac needs the original constructors)
_ORIGINALS: dict[Any, Callable[..., Any]] = {}


# -- what gets gated ------------------------------------------------------------

_SSL_CONTEXT_METHODS = (
    "load_cert_chain",
    "load_verify_locations",
    "load_default_certs",
    "set_default_verify_paths",
    "set_ciphers",
    "load_dh_params",
    "set_ecdh_curve",
    "wrap_socket",
    "wrap_bio",
)
_RESOLVER = (
    "getaddrinfo",
    "getnameinfo",
    "gethostbyname",
    "gethostbyname_ex",
    "gethostbyaddr",
    "getservbyname",
    "getservbyport",
    "getprotobyname",
)


def _gate_ssl(ssl: Any) -> None:
    context = ssl.SSLContext
    new = context.__dict__["__new__"]
    context.__new__ = staticmethod(_gated_method(new.__func__, "ssl.SSLContext()"))
    for name in _SSL_CONTEXT_METHODS:
        if hasattr(context, name):
            setattr(context, name, _gated_method(getattr(context, name), f"SSLContext.{name}"))
    for cls in (ssl.SSLSocket, ssl.SSLObject):
        cls.do_handshake = _gated_method(cls.do_handshake, f"{cls.__name__}.do_handshake")
    for name in ("RAND_bytes", "RAND_status"):
        if hasattr(ssl, name):
            _gate_function(ssl, name)


def _gate_hashlib(hashlib: Any) -> None:
    _hashlib = sys.modules.get("_hashlib")
    if _hashlib is None:  # a Python without OpenSSL: nothing to guard
        return
    openssl = {id(v) for k, v in vars(_hashlib).items() if k.startswith("openssl_")}
    for name, value in list(vars(hashlib).items()):
        if name.startswith("_"):
            continue
        if id(value) in openssl or name in ("pbkdf2_hmac", "scrypt", "new"):
            _gate_function(hashlib, name)


def _gate_hmac(hmac: Any) -> None:
    # hmac takes OpenSSL's fast path only for str digest names and OpenSSL's
    # own constructors, which the gated wrappers no longer are: let wrappers
    # in, and hand OpenSSL the originals (anything else it does not know
    # still ends in hmac's pure-Python fallback, as before).
    _hashlib = sys.modules.get("_hashlib")
    if _hashlib is None or getattr(hmac, "_functype", None) is None:
        return
    hmac._functype = (hmac._functype, GatedFunction)
    for name in ("hmac_new", "hmac_digest"):
        original = getattr(_hashlib, name, None)
        if original is not None:
            setattr(_hashlib, name, _unwrapping(original))
            _gate_function(_hashlib, name)


def _unwrapping(func: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_ORIGINALS.get(a, a) if isinstance(a, GatedFunction) else a for a in args)
        kwargs = {
            k: _ORIGINALS.get(v, v) if isinstance(v, GatedFunction) else v
            for k, v in kwargs.items()
        }
        return func(*args, **kwargs)

    call.__name__ = call.__qualname__ = func.__name__
    return call


def _gate_socket(socket: Any) -> None:
    for name in _RESOLVER:
        if hasattr(socket, name):
            _gate_function(socket, name)


_PATCHES: dict[str, Callable[[Any], None]] = {
    "socket": _gate_socket,
    "hashlib": _gate_hashlib,
    "hmac": _gate_hmac,
    "ssl": _gate_ssl,
}


class _PatchOnImport:
    """A meta path finder that wraps ssl, hashlib, hmac and socket right
    after they are first imported."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: Any = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


class _PatchingLoader:
    def __init__(self, loader: Any, patch: Callable[[Any], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def install() -> None:
    """Activate the gate in this process (the zygote), and wrap the OpenSSL
    and resolver entry points now or as soon as they are imported. Call
    before any preload module runs."""
    GATE.active = True
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
    sys.meta_path.insert(0, _PatchOnImport())


def thread_name(ident: int) -> str:
    """A thread's name for a warning, by its ident."""
    thread = threading._active.get(ident)  # type: ignore[attr-defined]
    return repr(thread.name) if thread is not None else f"thread {ident}"
