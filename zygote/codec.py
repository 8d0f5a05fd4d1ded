"""The codec: messages to msgpack bytes and back, and stream framing. No I/O.

A message travels as one msgpack map, ``{"v": 1, "kind": ..., fields...}``.
Decoding is bounded (a size limit first, then msgpack's own limits, which
follow the input's size) and strict: every field's type is checked against
the message class's annotations, and anything else raises a `ProtocolError`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    OK,
    PROTOCOL_VERSION,
    Attach,
    Boot,
    Booted,
    BootFailed,
    ChannelMessage,
    Collected,
    Control,
    Error,
    Exited,
    Fork,
    Forked,
    ForkFailed,
    Go,
    HelperExited,
    HelperStarted,
    Jobs,
    Kill,
    MalformedMessage,
    Message,
    MessageTooLarge,
    Ok,
    Output,
    Phase,
    Ping,
    Promote,
    ProtocolError,
    Ready,
    Reaped,
    Refork,
    Reload,
    Reply,
    Request,
    Result,
    Spawn,
    Spawned,
    Stats,
    Stop,
    Task,
    Threads,
    UnknownKind,
    UnsupportedVersion,
    ValidatorFailed,
    check_limits,
    check_profile_name,
    check_task_name,
    spawn_size,
)

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


_REQUESTS = _registry(Spawn, Attach, Collected, Kill, Stats, Jobs, Ping, Refork, Reload, Stop)
_REPLIES = _registry(Spawned, Result, Exited, Output, Ok, Error)
_CONTROL = _registry(
    Boot,
    Booted,
    BootFailed,
    Fork,
    Forked,
    ForkFailed,
    Threads,
    Reaped,
    HelperStarted,
    HelperExited,
)
_CHANNEL = _registry(Ready, Phase, ValidatorFailed, Result, Task, Go, Promote)
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
    # An int, not just equal to one: True and 1.0 compare equal to 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
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


def result_outcome(data: bytes) -> str | None:
    """The outcome of an encoded Result, read without decoding the value
    (which follows it: a big result is not copied); None if it is not one."""
    unpacker = msgpack.Unpacker(io.BytesIO(data), raw=False, read_size=4096)
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "outcome":
                outcome = unpacker.unpack()
                return outcome if isinstance(outcome, str) else None
            unpacker.skip()
    except Exception:  # msgpack raises several unrelated types for garbage
        return None
    return None


def ok_result_prefix(handle: str) -> bytes:
    """The start of an encoded ``Result(handle, OK, value=...)``: append
    ``msgpack.packb(value)`` (a bin) to complete it. Workers get it built
    before the fork, so that they pay neither for the dataclass nor for the
    generic encoder on the way to the result."""
    fields = {"v": PROTOCOL_VERSION, "kind": Result.KIND, "handle": handle, "outcome": OK}
    head: bytes = msgpack.packb(fields, use_bin_type=True)
    assert head[0] == 0x80 | len(fields)  # a fixmap; one more entry follows
    return bytes([head[0] + 1]) + head[1:] + b"\xa5value"  # the key, a fixstr


# -- spawn requests, as clients make them ------------------------------------


def prepare_spawn(
    task: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    env: dict[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    profile: str | None,
) -> tuple[bytes, dict[str, str] | None, str | None, int]:
    """A spawn's checked parts, as the server would check them (ValueError):
    the payload, env and cwd as sent, and the request's size (for the server's
    limit). Shared by the sync and asyncio clients."""
    try:
        check_task_name(task)
        check_profile_name(profile)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    if timeout is not None and not timeout > 0:
        raise ValueError("_timeout must be a positive number of seconds")
    try:
        payload = msgpack.packb([list(args), kwargs], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(_unsendable_argument(args, kwargs, exc)) from None
    sent_env = {str(k): str(v) for k, v in env.items()} if env is not None else None
    sent_cwd = os.fspath(cwd) if cwd is not None else None
    return payload, sent_env, sent_cwd, spawn_size(task, payload, sent_env, sent_cwd)


def unsendable(what: str, value: object, exc: Exception) -> str:
    """Why `value` cannot go over the wire, in words: "argument 1 (object)
    cannot be sent: msgpack cannot serialize 'object' object"."""
    text = str(exc).removeprefix("can not serialize ")
    return f"{what} ({type(value).__name__}) cannot be sent: msgpack cannot serialize {text}"


def _unsendable_argument(args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception) -> str:
    """The first argument msgpack refuses, named (packed again one by one:
    only on this error path)."""
    named = [(f"argument {n}", arg) for n, arg in enumerate(args, 1)]
    named += [(f"keyword argument {key!r}", arg) for key, arg in kwargs.items()]
    for what, value in named:
        try:
            msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as own:
            return unsendable(what, value, own)
    return unsendable("the arguments", kwargs, exc)  # a keyword that is not a str


def prepare_limits(limits: dict[str, float] | None) -> dict[str, float] | None:
    """A spawn's `_limits` as sent, checked as the server would (ValueError)."""
    if limits is None:
        return None
    try:
        sent = {str(k): v for k, v in limits.items()}
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in sent.values()):
            raise ValueError(f"_limits values must be numbers: {limits!r}")
        check_limits(sent)
    except ProtocolError as exc:
        raise ValueError(f"_limits: {exc}") from None
    return sent


def check_spawn_size(size: int, limit: int) -> None:
    if size > limit:
        raise ValueError(
            f"a request of {size} bytes (arguments and environment) exceeds the "
            f"server's limit of {limit}: pass a file path instead"
        )


# -- stream framing (worker channels) -----------------------------------------

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
MAX_FRAME_BYTES = (1 << 32) - 1


def frame(payload: bytes) -> bytes:
    """Length-prefix one encoded message for a stream socket."""
    return _HEADER.pack(len(payload)) + payload


#: The one-frame go-ahead to a child whose task came with its fork request.
GO_FRAME = frame(encode(Go()))


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
            # One copy out of the buffer (slicing the bytearray would make two).
            with memoryview(buf) as view:
                frames.append(bytes(view[start + HEADER_SIZE : end]))
            start = end
        del buf[:start]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buffer)
