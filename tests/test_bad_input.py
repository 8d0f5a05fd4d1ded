"""Bad input on the endpoint gets a clear error and never stops the server (core #7)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgpack
import pytest
import zmq

from zygote import TaskError, Zygote
from zygote.codec import (
    decode_reply,
)
from zygote.protocol import (
    Error,
)
from zygote.server.endpoint import MAX_BATCH

from .conftest import Server, raw_socket


def _error_for(sock, *frames: bytes) -> Error:
    sock.send_multipart(list(frames))
    reply = decode_reply(sock.recv())
    assert isinstance(reply, Error), reply
    return reply


def _still_serves(server: Server) -> None:
    with Zygote(server.endpoint, timeout=20) as client:
        assert client.spawn("tests.tasks:add", 2, 3).result() == 5


def _spawn_body(**override) -> dict:
    body = {
        "v": 1,
        "kind": "spawn",
        "req": 7,
        "task": "tests.tasks:add",
        "payload": msgpack.packb([[1, 2], {}]),
    }
    body.update(override)
    return body


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (os.urandom(64), "bad_request", "msgpack"),
        (b"\xc1", "bad_request", "msgpack"),
        (msgpack.packb([1, 2, 3]), "bad_request", "must be a msgpack map"),
        (msgpack.packb({"kind": "spawn"}), "unsupported_version", "version"),
        (msgpack.packb({"v": 99, "kind": "ping", "req": 1}), "unsupported_version", "99"),
        (msgpack.packb({"v": True, "kind": "ping", "req": 1}), "unsupported_version", "True"),
        (msgpack.packb({"v": 1.0, "kind": "ping", "req": 1}), "unsupported_version", "1.0"),
        (msgpack.packb({"v": 1, "kind": "launch_missiles", "req": 1}), "unknown_kind", "launch"),
        (msgpack.packb(_spawn_body(task=5)), "bad_request", "'task'"),
        (msgpack.packb(_spawn_body(payload="not bytes")), "bad_request", "'payload'"),
        (msgpack.packb(_spawn_body(task="no colon")), "bad_request", "package.module:function"),
        # The whole name must match: a regex "$" also matches before a final newline.
        (msgpack.packb(_spawn_body(task="tests.tasks:add\n")), "bad_request", "package.module"),
        (msgpack.packb(_spawn_body(handle="job-1\n")), "bad_request", "handle"),
        (msgpack.packb(_spawn_body(timeout=-1)), "bad_request", "timeout"),
        (msgpack.packb(_spawn_body(env={"A": 1})), "bad_request", "'env'"),
        # The server's own names (ready-pool forks, raw clients' jobs) have a ":".
        (msgpack.packb(_spawn_body(handle="pool:1")), "bad_request", "handle"),
        (msgpack.packb(_spawn_body(handle="x" * 65)), "bad_request", "handle"),
        (msgpack.packb({"v": 1, "kind": "spawn", "req": 7}), "bad_request", "missing field"),
        (
            msgpack.packb({"v": 1, "kind": "kill", "req": 7, "handle": "x", "signal": 999}),
            "bad_request",
            "signal",
        ),
    ],
)
def test_malformed_messages_get_error_replies(
    shared_server: Server, shared_raw, data, code, words
) -> None:
    reply = _error_for(shared_raw, data)
    assert reply.code == code
    assert words in reply.message
    _still_serves(shared_server)


def test_error_reply_carries_request_id_when_readable(shared_server: Server, shared_raw) -> None:
    reply = _error_for(shared_raw, msgpack.packb(_spawn_body(task="bad task", req=42)))
    assert reply.req == 42


def test_a_batch_past_the_limit_is_dropped_and_logged(shared_server: Server, shared_raw) -> None:
    ping = msgpack.packb({"v": 1, "kind": "ping", "req": 1})
    shared_raw.send_multipart([ping] * (MAX_BATCH + 1))
    _still_serves(shared_server)
    expected = f"a {MAX_BATCH + 2}-frame message: 1 to {MAX_BATCH} requests expected"
    assert expected in shared_server.log()
    assert shared_raw.poll(100) == 0  # nothing of it was answered


def test_a_flood_of_bad_messages_is_logged_once_per_interval(server: Server, raw) -> None:
    # 10,000 bad frames once gave 9,200 WARNING lines; every one is still
    # answered and counted.
    flood = 2000
    for _ in range(flood):
        raw.send(b"\xc1")
    for _ in range(flood):
        assert decode_reply(raw.recv()).code == "bad_request"
    _still_serves(server)
    assert server.stats()["rejected_messages"] == flood
    lines = [line for line in server.log().splitlines() if "rejected a message" in line]
    assert len(lines) == 1, lines  # the next report comes 10 s later, with a count


def test_bad_messages_are_logged_once_per_peer(server: Server) -> None:
    peers = [raw_socket(server.endpoint) for _ in range(2)]
    try:
        for sock in peers:
            for _ in range(10):
                sock.send(b"\xc1")
        for sock in peers:
            for _ in range(10):
                assert decode_reply(sock.recv()).code == "bad_request"
    finally:
        for sock in peers:
            sock.close()
    assert server.stats()["rejected_messages"] == 20
    lines = [line for line in server.log().splitlines() if "rejected a message" in line]
    assert len(lines) == 2, lines
    assert len({re.search(r"client ([0-9a-f]+):", line)[1] for line in lines}) == 2, lines  # type: ignore[index]


def test_oversized_message_gets_too_large(shared_start_server) -> None:
    server = shared_start_server("--max-message-bytes", "65536")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(server.endpoint)
    try:
        body = msgpack.packb(_spawn_body(payload=msgpack.packb([[b"x" * 70000], {}])))
        reply = _error_for(sock, body)
        assert reply.code == "too_large"
        # Far past the limit libzmq itself drops the message and the
        # connection; the server carries on.
        sock.send(b"\x00" * (1 << 20))
    finally:
        sock.close()
    _still_serves(server)


def test_client_refuses_arguments_over_the_limit_before_sending(shared_start_server) -> None:
    server = shared_start_server("--max-message-bytes", "65536")
    client = server.client(timeout=20)
    client.ping()  # learns the server's limit
    with pytest.raises(ValueError, match="exceeds the server's limit"):
        client.spawn("tests.tasks:identity", b"x" * 70000)
    assert client.spawn("tests.tasks:identity", b"x" * 1000).result() == b"x" * 1000


def test_unknown_task_is_a_clear_error(shared_client: Zygote) -> None:
    with pytest.raises(TaskError) as info:
        shared_client.spawn("no.such:thing").result()
    assert info.value.exc_type == "ModuleNotFoundError"
    assert "No module named 'no'" in str(info.value)
    with pytest.raises(TaskError) as info:
        shared_client.spawn("tests.tasks:no_such_function").result()
    assert info.value.exc_type == "AttributeError"
    with pytest.raises(TaskError) as info:
        shared_client.spawn("tests.tasks:not_callable").result()
    assert "not a callable" in str(info.value)
    assert shared_client.spawn("tests.tasks:add", 1, 1).result() == 2


def test_unserializable_result_is_a_clear_error(shared_client: Zygote) -> None:
    with pytest.raises(TaskError) as info:
        shared_client.spawn("tests.tasks:unserializable").result()
    assert info.value.exc_type == "TypeError"
    assert "cannot be sent" in str(info.value)
    assert shared_client.spawn("tests.tasks:add", 1, 1).result() == 2


def test_result_over_the_limit_is_a_clear_error(shared_start_server) -> None:
    server = shared_start_server("--max-message-bytes", "65536")
    client = server.client(timeout=20)
    with pytest.raises(TaskError, match="over the server's limit"):
        client.spawn("tests.tasks:big_result", 100_000).result()
    assert len(client.spawn("tests.tasks:big_result", 60_000).result()) == 60_000


def test_client_rejects_bad_arguments_locally(shared_client: Zygote) -> None:
    with pytest.raises(ValueError, match=r"package\.module:function"):
        shared_client.spawn("not a task")
    with pytest.raises(TypeError):
        shared_client.spawn("tests.tasks:identity", object())
    with pytest.raises(ValueError, match="_timeout"):
        shared_client.spawn("tests.tasks:identity", 1, _timeout=0)


def test_a_task_name_cannot_make_the_zygote_import_anything(start_server) -> None:
    # "zygote:Zygote" names the client class, reached through a module
    # __getattr__ that imports pyzmq: the zygote must not run it (it would
    # then hold libzmq, and every later child with it); the child may.
    server = start_server("--prefork", "0")  # tasks travel with fork requests
    client = server.client(timeout=20)
    with pytest.raises(TaskError):  # a class of the client, called with no endpoint
        client.spawn("zygote:Zygote", "ipc:///nonexistent/x").result()
    zygote_pid = server.stats()["zygote_pid"]
    maps = Path(f"/proc/{zygote_pid}/maps").read_text()
    assert "zmq" not in maps
