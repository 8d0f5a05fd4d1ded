"""Every message zygote's processes exchange, as data, and their codec.

No I/O happens here. Each message is a frozen dataclass with a `KIND`; the
codec turns it into one msgpack map (``{"v": 1, "kind": ..., fields...}``)
and back, checking every field's type on the way in. Anything that does not
decode into a known, well-formed message raises a `ProtocolError` subclass,
which the receiver turns into an error reply (or a logged drop): bad input
never takes a process down.

Four conversations use this module:

* client <-> supervisor, over ZeroMQ: `Spawn`, `Attach`, `Kill`, `Stats`,
  `Ping`, `Stop` and the replies `Spawned`, `Result`, `Exited`, `Ok`, `Error`;
* supervisor <-> zygote, over a SOCK_SEQPACKET socket: `Boot`, `Booted`,
  `BootFailed`, `Fork`, `Forked`, `ForkFailed`, `Threads`, `Reaped`;
* worker <-> supervisor, over the worker's own stream socket, framed by
  `FrameDecoder`: `Ready`, `Phase`, `ValidatorFailed`, `Result` from the
  worker; `Task` or `Go` to it.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1

#: Default bound on one client message (also the ZeroMQ socket's MAXMSGSIZE
#: slack is derived from it). Big inputs belong in files, not in messages.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_TASK_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MAX_TASK_LEN = 512


class ProtocolError(Exception):
    """A message that cannot be accepted. `code` goes into the `Error` reply."""

    code = "bad_request"


class MalformedMessage(ProtocolError):
    pass


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class UnknownKind(ProtocolError):
    code = "unknown_kind"


class MessageTooLarge(ProtocolError):
    code = "too_large"


# Error codes the supervisor sends besides the ProtocolError ones.
BUSY = "busy"
SPAWN_FAILED = "spawn_failed"
SHUTTING_DOWN = "shutting_down"
UNKNOWN_HANDLE = "unknown_handle"

# Result outcomes.
OK = "ok"  # the task returned; `value` holds it, msgpack-encoded
RAISED = "raised"  # the task raised; exc_type, message, traceback
EXITED = "exited"  # the task called sys.exit(); exit_code
LOST = "lost"  # the worker died without a result; exit_code or signal
TIMEOUT = "timeout"  # the task outlived its timeout and was killed
OUTCOMES = frozenset({OK, RAISED, EXITED, LOST, TIMEOUT})


@dataclass(frozen=True, slots=True)
class Message:
    KIND: ClassVar[str] = ""


# -- client -> supervisor ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn(Message):
    """Run `task` ("package.module:qualname") in a new worker. `payload` is
    ``msgpack.packb([args, kwargs])``: the supervisor passes it through
    without decoding user data."""

    KIND = "spawn"
    req: int
    task: str
    payload: bytes
    timeout: float | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None

    def __post_init__(self) -> None:
        check_task_name(self.task)
        if self.timeout is not None and not self.timeout > 0:
            raise MalformedMessage(f"timeout must be a positive number, not {self.timeout!r}")


@dataclass(frozen=True, slots=True)
class Attach(Message):
    """Follow an existing handle: the server answers `Spawned` and pushes the
    handle's `Result` and `Exited` to this client when they are known."""

    KIND = "attach"
    req: int
    handle: str


@dataclass(frozen=True, slots=True)
class Kill(Message):
    KIND = "kill"
    req: int
    handle: str
    signal: int

    def __post_init__(self) -> None:
        if not 0 < self.signal < 65:
            raise MalformedMessage(f"not a signal number: {self.signal}")


@dataclass(frozen=True, slots=True)
class Stats(Message):
    KIND = "stats"
    req: int


@dataclass(frozen=True, slots=True)
class Ping(Message):
    KIND = "ping"
    req: int


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """Graceful stop: refuse new work, let running workers finish, exit."""

    KIND = "stop"
    req: int


# -- supervisor -> client ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawned(Message):
    KIND = "spawned"
    req: int
    handle: str
    pid: int
    generation: int
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Result(Message):
    """How a task ended. Written by the worker itself (or by the supervisor
    when the worker died without writing it) and forwarded as is."""

    KIND = "result"
    handle: str
    outcome: str
    value: bytes | None = None
    exc_type: str | None = None
    message: str = ""
    traceback: str = ""
    exit_code: int | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise MalformedMessage(f"unknown outcome {self.outcome!r}")


@dataclass(frozen=True, slots=True)
class Exited(Message):
    """The worker process is gone: its wait status decoded, and rusage."""

    KIND = "exited"
    handle: str
    pid: int
    exit_code: int | None
    signal: int | None
    description: str
    duration: float
    utime: float = 0.0
    stime: float = 0.0
    maxrss_kb: int = 0


@dataclass(frozen=True, slots=True)
class Ok(Message):
    KIND = "ok"
    req: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Error(Message):
    KIND = "error"
    req: int
    code: str
    message: str
    reasons: list[str] = field(default_factory=list)


# -- supervisor <-> zygote --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Boot(Message):
    """First message to a new zygote: what to preload and how to serve."""

    KIND = "boot"
    generation: int
    preload: list[str]
    cwd: str
    max_result_bytes: int
    log_level: str = "INFO"
    validators: list[str] = field(default_factory=list)
    disable_validators: list[str] = field(default_factory=list)
    thread_policy: str = "warn"
    allow_threads: list[str] = field(default_factory=list)
    prevent_fork_warning: float = 1.0


@dataclass(frozen=True, slots=True)
class Booted(Message):
    KIND = "booted"
    pid: int
    generation: int


@dataclass(frozen=True, slots=True)
class BootFailed(Message):
    KIND = "boot_failed"
    error: str


@dataclass(frozen=True, slots=True)
class Fork(Message):
    """Fork one worker for `handle`. A small task travels along (`task` set)
    so that the child finds it prepared in memory; otherwise the supervisor
    sends a `Task` down the worker's channel after `Forked`."""

    KIND = "fork"
    handle: str
    task: str | None = None
    payload: bytes | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None


@dataclass(frozen=True, slots=True)
class Forked(Message):
    """Sent with two descriptors: the supervisor's end of the worker's
    channel, and a pidfd of the worker."""

    KIND = "forked"
    handle: str
    pid: int
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ForkFailed(Message):
    KIND = "fork_failed"
    handle: str
    error: str
    #: refused by the thread policy: retrying cannot help
    refused: bool = False


@dataclass(frozen=True, slots=True)
class Threads(Message):
    """The zygote's thread inventory changed (sent on change, not per fork)."""

    KIND = "threads"
    threads: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Reaped(Message):
    KIND = "reaped"
    pid: int
    status: int
    utime: float
    stime: float
    maxrss_kb: int


# -- worker <-> supervisor ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready(Message):
    KIND = "ready"


@dataclass(frozen=True, slots=True)
class Phase(Message):
    """The worker is entering a named start-up step (a validator)."""

    KIND = "phase"
    name: str


@dataclass(frozen=True, slots=True)
class ValidatorFailed(Message):
    KIND = "validator_failed"
    name: str
    error: str


@dataclass(frozen=True, slots=True)
class Task(Message):
    KIND = "task"
    handle: str
    task: str
    payload: bytes
    env: dict[str, str] | None = None
    cwd: str | None = None


@dataclass(frozen=True, slots=True)
class Go(Message):
    """Run the task that came with the fork: the supervisor owns the channel."""

    KIND = "go"


Request = Spawn | Attach | Kill | Stats | Ping | Stop
Reply = Spawned | Result | Exited | Ok | Error
Control = Boot | Booted | BootFailed | Fork | Forked | ForkFailed | Threads | Reaped
ChannelMessage = Ready | Phase | ValidatorFailed | Result | Task | Go


def ok_result_prefix(handle: str) -> bytes:
    """The start of an encoded ``Result(handle, OK, value=...)``: append
    ``msgpack.packb(value)`` (a bin) to complete it. Workers get it built
    before the fork, so that they pay neither for the dataclass nor for the
    generic encoder on the way to the result."""
    fields = {"v": PROTOCOL_VERSION, "kind": Result.KIND, "handle": handle, "outcome": OK}
    head: bytes = msgpack.packb(fields, use_bin_type=True)
    assert head[0] == 0x80 | len(fields)  # a fixmap; one more entry follows
    return bytes([head[0] + 1]) + head[1:] + b"\xa5value"  # the key, a fixstr


def check_task_name(task: str) -> None:
    """Raise MalformedMessage unless `task` looks like "package.module:qualname"."""
    if len(task) > _MAX_TASK_LEN or not _TASK_RE.match(task):
        raise MalformedMessage(f"task must look like 'package.module:function', not {task!r:.80}")


# -- codec -----------------------------------------------------------------

_Checker = Callable[[object], bool]


def _checker(tp: Any) -> _Checker:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        parts = [_checker(a) for a in typing.get_args(tp)]
        return lambda v: any(p(v) for p in parts)
    if tp is type(None):
        return lambda v: v is None
    if tp is Any:
        return lambda v: True
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp in (str, bytes, bool):
        return lambda v: isinstance(v, tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        check = _checker(item)
        return lambda v: isinstance(v, list) and all(check(i) for i in v)
    if origin is dict:
        key, value = typing.get_args(tp)
        check_k, check_v = _checker(key), _checker(value)
        return lambda v: (
            isinstance(v, dict) and all(check_k(k) and check_v(x) for k, x in v.items())
        )
    raise TypeError(f"no wire checker for {tp!r}")


@dataclass(frozen=True, slots=True)
class _Spec:
    cls: type[Message]
    # (name, checker, required)
    fields: tuple[tuple[str, _Checker, bool], ...]


def _spec(cls: type[Message]) -> _Spec:
    hints = typing.get_type_hints(cls)
    fields = tuple(
        (
            f.name,
            _checker(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )
    return _Spec(cls, fields)


def _registry(*classes: type[Message]) -> dict[str, _Spec]:
    return {cls.KIND: _spec(cls) for cls in classes}


_REQUESTS = _registry(Spawn, Attach, Kill, Stats, Ping, Stop)
_REPLIES = _registry(Spawned, Result, Exited, Ok, Error)
_CONTROL = _registry(Boot, Booted, BootFailed, Fork, Forked, ForkFailed, Threads, Reaped)
_CHANNEL = _registry(Ready, Phase, ValidatorFailed, Result, Task, Go)
_FIELD_NAMES = {
    spec.cls: tuple(name for name, _, _ in spec.fields)
    for registry in (_REQUESTS, _REPLIES, _CONTROL, _CHANNEL)
    for spec in registry.values()
}


def encode(message: Message) -> bytes:
    """One message as one msgpack map."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": message.KIND}
    for name in _FIELD_NAMES[type(message)]:
        body[name] = getattr(message, name)
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _decode(data: bytes, registry: dict[str, _Spec], max_bytes: int) -> Message:
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise MalformedMessage(f"not a msgpack message: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedMessage(f"a message must be a msgpack map, not {type(body).__name__}")
    version = body.get("v")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported (this server speaks {PROTOCOL_VERSION})"
        )
    kind = body.get("kind")
    spec = registry.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise UnknownKind(f"unknown message kind {kind!r:.60}")
    kwargs = {}
    for name, check, required in spec.fields:
        if name in body:
            value = body[name]
            if not check(value):
                raise MalformedMessage(
                    f"{kind}: field {name!r} has the wrong type ({type(value).__name__})"
                )
            kwargs[name] = value
        elif required:
            raise MalformedMessage(f"{kind}: missing field {name!r}")
    try:
        return spec.cls(**kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"{kind}: {exc}") from None


def decode_request(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """A client's message, as seen by the supervisor."""
    return _decode(data, _REQUESTS, max_bytes)  # type: ignore[return-value]


def decode_reply(data: bytes) -> Reply:
    """A supervisor's message, as seen by the client."""
    return _decode(data, _REPLIES, 1 << 62)  # type: ignore[return-value]


def decode_control(data: bytes) -> Control:
    """A message between supervisor and zygote."""
    return _decode(data, _CONTROL, 1 << 62)  # type: ignore[return-value]


def decode_channel(data: bytes, max_bytes: int = 1 << 62) -> ChannelMessage:
    """A message on a worker's channel."""
    return _decode(data, _CHANNEL, max_bytes)  # type: ignore[return-value]


def request_id(data: bytes) -> int:
    """Best-effort `req` of a message that failed to decode, so the error
    reply can still be matched to its request (0 when there is none)."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return 0
    req = body.get("req") if isinstance(body, dict) else None
    return req if isinstance(req, int) and not isinstance(req, bool) else 0


# -- stream framing (worker channels) -----------------------------------------

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
MAX_FRAME_BYTES = (1 << 32) - 1


def frame(payload: bytes) -> bytes:
    """Length-prefix one encoded message for a stream socket."""
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into length-prefixed frames; no I/O.

    `feed()` bytes as they arrive and get every complete frame back. A frame
    announced bigger than `max_frame` raises MessageTooLarge at once, before
    its body is buffered.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buffer
        buf += data
        frames = []
        start = 0
        while len(buf) - start >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buf, start)
            if size > self._max:
                raise MessageTooLarge(f"frame of {size} bytes exceeds the limit of {self._max}")
            end = start + HEADER_SIZE + size
            if len(buf) < end:
                break
            frames.append(bytes(buf[start + HEADER_SIZE : end]))
            start = end
        del buf[:start]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buffer)
