"""The message codec and framing: pure logic, no processes."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zygote.codec import (
    FrameDecoder,
    decode_channel,
    decode_reply,
    decode_request,
    encode,
    frame,
    ok_result_prefix,
    request_id,
)
from zygote.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Collected,
    Error,
    Kill,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    Result,
    Spawn,
    Spawned,
    UnknownKind,
    UnsupportedVersion,
)


def test_round_trip_of_every_request_and_reply() -> None:
    spawn = Spawn(1, "pkg.mod:func", b"\x92\x90\x80", 2.5, {"A": "b"}, "/tmp")
    assert decode_request(encode(spawn)) == spawn
    assert decode_request(encode(Kill(2, "h-1", 9))) == Kill(2, "h-1", 9)
    assert decode_request(encode(Collected(["h-1", "h-2"]))) == Collected(["h-1", "h-2"])
    spawned = Spawned(3, "h-1", 1234, 2, ["warning"])
    assert decode_reply(encode(spawned)) == spawned
    result = Result("h-1", "raised", exc_type="ValueError", message="m", traceback="t")
    assert decode_reply(encode(result)) == result
    assert decode_channel(encode(result)) == result
    assert decode_reply(encode(Error(4, "busy", "full", ["r"]))) == Error(4, "busy", "full", ["r"])


def test_prebuilt_ok_result_prefix_makes_a_valid_result() -> None:
    value = msgpack.packb({"answer": 42})
    data = ok_result_prefix("h-7") + msgpack.packb(value)
    assert decode_reply(data) == Result("h-7", "ok", value=value)


def test_optional_fields_take_defaults_and_unknown_fields_are_ignored() -> None:
    body = {"v": 1, "kind": "spawn", "req": 1, "task": "a:b", "payload": b"", "extra": 1}
    assert decode_request(msgpack.packb(body)) == Spawn(1, "a:b", b"")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"v": 1, "kind": "spawned", "req": 1}, UnknownKind),  # a reply is not a request
        ({"v": 2, "kind": "ping", "req": 1}, UnsupportedVersion),
        ({"v": 1, "kind": "ping", "req": True}, MalformedMessage),  # bool is not an int
        ({"v": 1, "kind": "ping", "req": 1.0}, MalformedMessage),
        (
            {"v": 1, "kind": "spawn", "req": 1, "task": "a:b", "payload": b"", "timeout": 0},
            MalformedMessage,
        ),
        ({"v": 1, "kind": "spawn", "req": 1, "task": "a:b; rm", "payload": b""}, MalformedMessage),
        (
            {"v": 1, "kind": "spawn", "req": 1, "task": "a" * 600 + ":b", "payload": b""},
            MalformedMessage,
        ),
    ],
)
def test_rejections(body: dict, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        decode_request(msgpack.packb(body))


def test_size_limit_is_checked_before_decoding() -> None:
    with pytest.raises(MessageTooLarge):
        decode_request(b"\x00" * 11, max_bytes=10)


@given(st.binary(max_size=512))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_never_escape_as_anything_but_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_request(data)
    assert isinstance(request_id(data), int)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(
            ["v", "kind", "req", "task", "payload", "timeout", "env", "cwd", "handle", "signal"]
        ),
        _json,
    )
)
@settings(max_examples=500, deadline=None)
def test_arbitrary_maps_never_escape_as_anything_but_protocol_error(body: dict) -> None:
    body.setdefault("v", 1)
    with contextlib.suppress(ProtocolError):
        decode_request(msgpack.packb(body), DEFAULT_MAX_MESSAGE_BYTES)


def test_frame_decoder_reassembles_split_frames() -> None:
    decoder = FrameDecoder()
    data = frame(b"one") + frame(b"") + frame(b"three")
    got = []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
    assert got == [b"one", b"", b"three"]
    assert decoder.pending == 0


def test_frame_decoder_refuses_huge_frames_before_buffering() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(MessageTooLarge):
        decoder.feed(frame(b"x" * 101)[:4])
