"""docs/protocol.md is enough to write a client: these tests drive a real
server with a bare ZeroMQ DEALER and msgpack, from that document only (no
import from `zygote`)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from .conftest import REPO, Server

Sock = zmq.Socket[bytes]

#: Every wait for the server is bounded by this (seconds).
DEADLINE = 10.0


def _connect(endpoint: str) -> Sock:
    sock: Sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # §1: take in everything the server sends
    sock.setsockopt(zmq.ROUTING_ID, b"z" + os.urandom(15))  # §1: our own, stable name
    sock.connect(endpoint)
    return sock


@pytest.fixture
def sock(server: Server) -> Iterator[Sock]:
    s = _connect(server.endpoint)
    yield s
    s.close()


@pytest.fixture
def shared_sock(shared_server: Server) -> Iterator[Sock]:
    """`sock`, on the shared server (tests/conftest.py: SharedServers)."""
    s = _connect(shared_server.endpoint)
    yield s
    s.close()


def send(sock: Sock, kind: str, **fields: Any) -> None:
    sock.send(msgpack.packb({"v": 1, "kind": kind, **fields}, use_bin_type=True))


def receive(sock: Sock, timeout: float = DEADLINE) -> dict[str, Any]:
    """The next message: one frame (§1: a ZeroMQ message may carry several,
    `recv()` returns them one by one), one msgpack map, version 1."""
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError(f"no message from the server within {timeout}s")
    msg = msgpack.unpackb(sock.recv(), raw=False)
    assert isinstance(msg, dict) and msg["v"] == 1, msg
    return msg


def receive_until(sock: Sock, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while not done(messages):
        messages.append(receive(sock))
    return messages


def payload(*args: Any, **kwargs: Any) -> bytes:
    """§3 spawn: msgpack([args, kwargs])."""
    data: bytes = msgpack.packb([list(args), kwargs], use_bin_type=True)
    return data


def spawn(sock: Sock, req: int, task: str, *args: Any, **fields: Any) -> None:
    send(sock, "spawn", req=req, task=task, payload=payload(*args), **fields)


def value_of(result: dict[str, Any]) -> Any:
    """§4: an ok result's value is a bin holding the msgpack of the return value."""
    assert result["kind"] == "result" and result["outcome"] == "ok", result
    value = result.get("value")
    if value is None:
        return None
    assert isinstance(value, bytes)
    return msgpack.unpackb(value, raw=False)


def call(sock: Sock, kind: str, req: int, **fields: Any) -> dict[str, Any]:
    """A request answered by one message (nothing else is in flight)."""
    send(sock, kind, req=req, **fields)
    reply = receive(sock)
    assert reply["req"] == req, reply
    return reply


def expect_error(reply: dict[str, Any], req: int, code: str, words: str = "") -> None:
    assert reply["kind"] == "error", reply
    assert (reply["req"], reply["code"]) == (req, code), reply
    assert words in reply["message"], reply
    assert reply.get("reasons", []) == [] or code == "spawn_failed"


# -- ping, stats ---------------------------------------------------------------


def test_ping_answers_with_the_servers_identity(shared_server: Server, shared_sock: Sock) -> None:
    reply = call(shared_sock, "ping", 1)
    assert reply["kind"] == "ok"
    info = reply["info"]
    assert re.fullmatch(r"[0-9a-f]{8}", info["server"])
    assert info["pid"] == shared_server.pid
    assert isinstance(info["version"], str)
    assert info["max_workers"] == 4  # the fixture's --max-workers
    assert info["max_message_bytes"] == 16 * 1024 * 1024


def test_jobs_lists_what_is_running(shared_sock: Sock) -> None:
    spawn(shared_sock, 1, "tests.tasks:sleep", 30, handle="doc-jobs-1")
    assert receive(shared_sock)["kind"] == "spawned"
    (job,) = call(shared_sock, "jobs", 2)["info"]["jobs"]
    assert (job["id"], job["task"], job["state"]) == ("doc-jobs-1", "tests.tasks:sleep", "running")
    assert job["pid"] > 0 and job["runtime"] >= 0 and job["profile"] == "default"
    assert call(shared_sock, "kill", 3, handle="doc-jobs-1", signal=9)["kind"] == "ok"


def test_stats_is_the_identity_and_the_figures(shared_server: Server, shared_sock: Sock) -> None:
    identity = call(shared_sock, "ping", 1)["info"]
    reply = call(shared_sock, "stats", 2)
    assert reply["kind"] == "ok"
    info = reply["info"]
    assert {key: info[key] for key in identity} == identity
    assert info["state"] == "running"
    assert info["endpoint"] == shared_server.endpoint
    for key in ("workers", "queued", "accepted", "completed", "results_kept", "queue_size"):
        assert isinstance(info[key], int), key
    assert isinstance(info["profiles"], dict) and "default" in info["profiles"]


def test_the_req_style_empty_delimiter_is_accepted_and_echoed(shared_sock: Sock) -> None:
    body = msgpack.packb({"v": 1, "kind": "ping", "req": 3})
    shared_sock.send_multipart([b"", body])
    assert shared_sock.poll(int(DEADLINE * 1000))
    delimiter, data = shared_sock.recv_multipart()
    assert delimiter == b""
    assert msgpack.unpackb(data)["req"] == 3


def test_a_batch_of_requests_is_answered_in_order_in_one_message(sock: Sock) -> None:
    """§1, batches: several requests as the frames of one message; the
    answers come together, each its own frame, RCVMORE on all but the last."""
    max_batch = call(sock, "ping", 1)["info"]["max_batch"]
    assert max_batch >= 3
    bodies = [{"v": 1, "kind": "ping", "req": 2}, {"v": 1, "kind": "nonsense", "req": 3}]
    sock.send_multipart(
        [msgpack.packb(body) for body in [*bodies, {"v": 1, "kind": "stats", "req": 4}]]
    )
    assert sock.poll(int(DEADLINE * 1000))
    first = msgpack.unpackb(sock.recv())
    assert sock.getsockopt(zmq.RCVMORE)
    second = msgpack.unpackb(sock.recv())
    assert sock.getsockopt(zmq.RCVMORE)
    third = msgpack.unpackb(sock.recv())
    assert not sock.getsockopt(zmq.RCVMORE)
    assert (first["kind"], first["req"]) == ("ok", 2)
    assert (second["kind"], second["req"], second["code"]) == ("error", 3, "unknown_kind")
    assert (third["kind"], third["req"]) == ("ok", 4)


# -- a job's messages --------------------------------------------------------------


def test_a_named_spawn_is_answered_then_its_result_and_exit_are_pushed(shared_sock: Sock) -> None:
    handle = "doc-add-1"
    spawn(shared_sock, 1, "tests.tasks:add", 2, 3, handle=handle)
    spawned, result, exited = (receive(shared_sock) for _ in range(3))
    assert spawned["kind"] == "spawned"
    assert (spawned["req"], spawned["handle"]) == (1, handle)
    assert isinstance(spawned["pid"], int) and isinstance(spawned["generation"], int)
    assert spawned["warnings"] == []
    assert result["handle"] == handle
    assert value_of(result) == 5
    assert exited["kind"] == "exited"
    assert (exited["handle"], exited["pid"]) == (handle, spawned["pid"])
    assert (exited["exit_code"], exited["signal"]) == (0, None)
    assert exited["description"] == "exited normally"
    assert exited["duration"] >= 0

    # §7: confirmed, with its exit known: the server forgets the job.
    send(shared_sock, "collected", handles=[handle])  # never answered
    expect_error(call(shared_sock, "attach", 2, handle=handle), 2, "unknown_handle", "collected")
    assert call(shared_sock, "stats", 3)["info"]["results_kept"] == 0
    # §6: a name is never run twice.
    spawn(shared_sock, 4, "tests.tasks:add", 2, 3, handle=handle)
    expect_error(receive(shared_sock), 4, "spawn_failed", "already ended")


def test_keyword_arguments_env_and_cwd_reach_the_task(shared_sock: Sock, tmp_path: Path) -> None:
    send(
        shared_sock,
        "spawn",
        req=1,
        task="tests.tasks:echo",
        payload=payload(1, "two", b"\x03", three=[4]),
        handle="doc-echo-1",
    )
    _, result, _ = (receive(shared_sock) for _ in range(3))
    assert value_of(result) == {"args": [1, "two", b"\x03"], "kwargs": {"three": [4]}}
    spawn(shared_sock, 2, "tests.tasks:env", "DOC_VAR", env={"DOC_VAR": "set"}, handle="doc-env-1")
    _, result, _ = (receive(shared_sock) for _ in range(3))
    assert value_of(result) == "set"
    spawn(shared_sock, 3, "tests.tasks:cwd", cwd=str(tmp_path), handle="doc-cwd-1")
    _, result, _ = (receive(shared_sock) for _ in range(3))
    assert value_of(result) == str(tmp_path)
    send(shared_sock, "collected", handles=["doc-echo-1", "doc-env-1", "doc-cwd-1"])


def test_a_spawn_with_limits_that_runs_into_one_is_lost_naming_it(shared_sock: Sock) -> None:
    limits = {"memory": 16 << 20}  # §3: lowers the server's limits for this job
    spawn(shared_sock, 1, "tests.leftovers:allocate", 64 << 20, limits=limits, handle="doc-limit-1")
    _, result, _ = (receive(shared_sock) for _ in range(3))
    assert (result["outcome"], result["limit"]) == ("lost", "memory"), result  # §4
    spawn(shared_sock, 2, "tests.leftovers:allocate", 1, limits={"disk": 1}, handle="doc-limit-2")
    expect_error(receive(shared_sock), 2, "bad_request", "unknown limit")
    send(shared_sock, "collected", handles=["doc-limit-1"])


def test_a_spawn_without_a_handle_gets_a_server_made_one(shared_sock: Sock) -> None:
    server_id = call(shared_sock, "ping", 1)["info"]["server"]
    spawn(shared_sock, 2, "tests.tasks:sleep", 0, None)
    spawned, result, _ = (receive(shared_sock) for _ in range(3))
    # §6: it has a ":", and 96 random bits
    assert re.fullmatch(rf"{server_id}:[0-9a-f]{{24}}", spawned["handle"])
    assert result["handle"] == spawned["handle"]
    assert value_of(result) is None


def test_the_same_spawn_sent_again_is_answered_like_attach(
    shared_server: Server, shared_sock: Sock
) -> None:
    handle = "doc-again-1"
    accepted = call(shared_sock, "stats", 100)["info"]["accepted"]
    spawn(shared_sock, 1, "tests.tasks:sleep", 0.5, "slept", handle=handle)
    spawn(shared_sock, 2, "tests.tasks:sleep", 0.5, "slept", handle=handle)  # a reply was lost
    messages = receive_until(shared_sock, lambda got: any(m["kind"] == "exited" for m in got))
    kinds = [m["kind"] for m in messages]
    assert kinds == ["spawned", "spawned", "result", "exited"], messages
    assert sorted(m["req"] for m in messages[:2]) == [1, 2]
    assert messages[0]["pid"] == messages[1]["pid"]
    assert value_of(messages[2]) == "slept"

    # Once more, after the job ended: the result and exit are pushed again,
    # and the task (here even a different one) is not run.
    spawn(shared_sock, 3, "tests.tasks:add", 1, 1, handle=handle)
    spawned, result, exited = (receive(shared_sock) for _ in range(3))
    assert (spawned["kind"], spawned["req"], spawned["pid"]) == ("spawned", 3, messages[0]["pid"])
    assert value_of(result) == "slept"
    assert exited == messages[3]

    # An attach from another connection gets the same.
    other = _connect(shared_server.endpoint)
    try:
        send(other, "attach", req=1, handle=handle)
        spawned, result, exited = (receive(other) for _ in range(3))
        assert (spawned["kind"], spawned["req"], spawned["handle"]) == ("spawned", 1, handle)
        assert value_of(result) == "slept"
        assert exited["kind"] == "exited"
    finally:
        other.close()
    assert call(shared_sock, "stats", 4)["info"]["accepted"] == accepted + 1
    send(shared_sock, "collected", handles=[handle])


def test_attach_of_an_unknown_handle(shared_sock: Sock) -> None:
    reply = call(shared_sock, "attach", 9, handle="doc-never-spawned")
    expect_error(reply, 9, "unknown_handle", "no such job")


def test_a_task_that_raises(shared_sock: Sock) -> None:
    spawn(shared_sock, 1, "tests.tasks:raise_value_error", "boom", handle="doc-raise-1")
    spawned, result, exited = (receive(shared_sock) for _ in range(3))
    assert spawned["kind"] == "spawned"
    assert (result["kind"], result["outcome"]) == ("result", "raised")
    assert (result["exc_type"], result["message"]) == ("ValueError", "boom")
    assert "ValueError: boom" in result["traceback"]
    assert result.get("value") is None
    assert (exited["kind"], exited["exit_code"]) == ("exited", 0)  # the process ended well


def test_a_task_that_cannot_be_found_raises_too(shared_sock: Sock) -> None:
    spawn(shared_sock, 1, "no_such_module:f", handle="doc-missing-1")
    spawned, result, _ = (receive(shared_sock) for _ in range(3))
    assert spawned["kind"] == "spawned"  # not resolved before the worker runs it
    assert (result["outcome"], result["exc_type"]) == ("raised", "ModuleNotFoundError")


def test_kill_of_a_running_job(shared_sock: Sock) -> None:
    handle = "doc-kill-1"
    spawn(shared_sock, 1, "tests.tasks:sleep", 60, handle=handle)
    spawned = receive(shared_sock)
    assert spawned["kind"] == "spawned"
    reply = call(shared_sock, "kill", 2, handle=handle, signal=signal.SIGTERM)
    assert (reply["kind"], reply["info"]) == ("ok", {"pid": spawned["pid"]})
    result, exited = receive(shared_sock), receive(shared_sock)
    assert (result["handle"], result["outcome"]) == (handle, "lost")
    assert (result["signal"], result["exit_code"]) == (signal.SIGTERM, None)
    assert "killed by SIGTERM" in result["message"]
    assert (exited["signal"], exited["exit_code"]) == (signal.SIGTERM, None)
    assert exited["description"] == "killed by SIGTERM"
    # Gone: nothing left to kill.
    expect_error(call(shared_sock, "kill", 3, handle=handle, signal=9), 3, "unknown_handle")


def test_a_task_past_its_timeout_is_killed(shared_sock: Sock) -> None:
    spawn(shared_sock, 1, "tests.tasks:sleep", 60, handle="doc-timeout-1", timeout=0.3)
    _, result, exited = (receive(shared_sock) for _ in range(3))
    assert (result["outcome"], result["signal"]) == ("timeout", signal.SIGTERM)
    assert "timeout" in result["message"]
    assert exited["signal"] == signal.SIGTERM


def test_busy_when_the_slots_and_the_queue_are_full(start_server: Callable[..., Server]) -> None:
    server = start_server("--max-workers", "1", "--queue-size", "1")
    sock = _connect(server.endpoint)
    try:
        spawn(sock, 1, "tests.tasks:sleep", 60, handle="doc-busy-1")
        assert receive(sock)["kind"] == "spawned"
        spawn(sock, 2, "tests.tasks:sleep", 60, handle="doc-busy-2")  # queued: no reply yet
        spawn(sock, 3, "tests.tasks:sleep", 60, handle="doc-busy-3")
        expect_error(receive(sock), 3, "busy", "server busy")
        # §4 kill: a queued job is cancelled; its spawn is answered so.
        send(sock, "kill", req=4, handle="doc-busy-2", signal=9)
        replies = receive_until(sock, lambda got: len(got) == 2)
        by_req = {reply["req"]: reply for reply in replies}
        assert by_req[4]["kind"] == "ok" and by_req[4]["info"] == {"pid": 0}
        expect_error(
            by_req[2], 2, "spawn_failed", "killed by a client (SIGKILL) before it was ready"
        )
        reply = call(sock, "kill", 5, handle="doc-busy-2", signal=9)  # ended: unknown now
        expect_error(reply, 5, "unknown_handle", "no running worker")
    finally:
        sock.close()


# -- bad input ---------------------------------------------------------------------


def test_a_malformed_message_gets_an_error_with_its_request_id(shared_sock: Sock) -> None:
    spawn(shared_sock, 42, "not a task")
    expect_error(receive(shared_sock), 42, "bad_request", "package.module:function")
    send(shared_sock, "spawn", req=43, task="tests.tasks:add", payload="a str, not a bin")
    expect_error(receive(shared_sock), 43, "bad_request", "'payload'")
    spawn(shared_sock, 44, "tests.tasks:add", 1, 2, handle="has:colon")  # §6: ours only
    expect_error(receive(shared_sock), 44, "bad_request", "handle")
    send(shared_sock, "spawn", req=45)
    expect_error(receive(shared_sock), 45, "bad_request", "missing field")
    send(shared_sock, "kill", req=46, handle="x", signal=0)
    expect_error(receive(shared_sock), 46, "bad_request", "signal")
    send(shared_sock, "launch", req=47)
    expect_error(receive(shared_sock), 47, "unknown_kind", "launch")
    send(shared_sock, "result", req=48, handle="x", outcome="ok")  # a reply kind
    expect_error(receive(shared_sock), 48, "unknown_kind")
    # Unreadable: no request id to give back.
    shared_sock.send(b"\xc1")
    expect_error(receive(shared_sock), 0, "bad_request", "msgpack")
    shared_sock.send(msgpack.packb([1, 2]))
    expect_error(receive(shared_sock), 0, "bad_request", "map")
    # Unknown fields are ignored.
    assert call(shared_sock, "ping", 49, future_field="x")["kind"] == "ok"


def test_a_version_mismatch_is_unsupported_version(shared_sock: Sock) -> None:
    shared_sock.send(msgpack.packb({"v": 2, "kind": "ping", "req": 7}))
    expect_error(receive(shared_sock), 7, "unsupported_version", "this server speaks 1")
    shared_sock.send(msgpack.packb({"kind": "ping", "req": 8}))
    expect_error(receive(shared_sock), 8, "unsupported_version")
    assert call(shared_sock, "ping", 9)["kind"] == "ok"  # the connection goes on


# -- the document itself -----------------------------------------------------------


def test_the_document_names_every_kind_outcome_and_error_code() -> None:
    """Read (not imported) from zygote/protocol.py and its errors, so that a
    new message kind, outcome or error code cannot be added without
    documenting it."""
    source = "".join(
        (REPO / "zygote" / name).read_text() for name in ("protocol.py", "protocol_errors.py")
    )
    doc = (REPO / "docs" / "protocol.md").read_text()
    kinds = dict(re.findall(r'^class (\w+)\(Message\):.*?KIND = "(\w+)"', source, re.M | re.S))
    names = []
    for union in ("Request", "Reply"):
        line = re.search(rf"^{union} = (.+)$", source, re.M)
        assert line is not None, union
        names += [name.strip() for name in line.group(1).split("|")]
    body = source.split("class ErrorCode")[1].split("\n\n\n")[0]
    codes = re.findall(r'^    [A-Z_]+ = "(\w+)"', body, re.M)
    outcomes = re.findall(r'^(?:OK|RAISED|EXITED|LOST|TIMEOUT) = "(\w+)"', source, re.M)
    version = re.search(r"^PROTOCOL_VERSION = (\d+)$", source, re.M)
    assert len(names) == 16 and len(codes) >= 10 and len(outcomes) == 5 and version
    for word in [kinds[name] for name in names] + codes + outcomes:
        assert f"`{word}`" in doc, word
    assert f'"v": {version.group(1)}' in doc
