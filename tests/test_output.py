"""A task's stdout and stderr: streamed live to whoever follows the job,
before its result; a tail kept for a late `attach`; the log when nobody
listens. Real servers, the CLI as real subprocesses."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from zygote import aio

from .conftest import Server, wait_until, zygote_cli

DEADLINE = 20.0
ZYGOTE = [sys.executable, "-m", "zygote"]
TAIL = 64 * 1024


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server("--max-workers", "2")


@pytest.fixture
def shared_server(shared_start_server: Callable[..., Server]) -> Server:
    """This module's `server`, shared (tests/conftest.py: SharedServers)."""
    return shared_start_server("--max-workers", "2")


def _joined(pieces: list[tuple[str, bytes]], stream: str) -> bytes:
    return b"".join(data for name, data in pieces if name == stream)


def test_cli_spawn_prints_the_output_then_the_result(shared_server: Server) -> None:
    out = zygote_cli("spawn", "--endpoint", shared_server.endpoint, "builtins:print", "hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\nnull\n"
    # Nothing of it was left for the server's log.
    assert "hello" not in shared_server.log()


def test_cli_keeps_stdout_and_stderr_apart(shared_server: Server) -> None:
    task = "tests.output_tasks:both_streams"
    out = zygote_cli("spawn", "--endpoint", shared_server.endpoint, task)
    assert out.returncode == 0, out.stderr
    # The last line lacked its newline: the result still gets a line of its own.
    assert out.stdout == 'to stdout\nno newline at the end\n"done"\n'
    assert out.stderr == "to stderr\n"


def test_output_streams_live_before_the_task_ends(shared_server: Server, tmp_path: Path) -> None:
    go_on = tmp_path / "go-on"
    with shared_server.client(timeout=DEADLINE) as client:
        handle = client.spawn("tests.output_tasks:print_then_wait", str(go_on))
        pieces = handle.output(timeout=DEADLINE)
        # The task waits for the file we make only after this: it still runs.
        assert next(pieces) == ("stdout", b"first\n")
        assert not handle.done()
        go_on.touch()
        assert list(pieces) == [("stdout", b"second\n")]
        assert handle.result(DEADLINE) == 7


def test_python_client_separates_the_streams(shared_server: Server) -> None:
    with shared_server.client(timeout=DEADLINE) as client:
        handle = client.spawn("tests.output_tasks:both_streams")
        pieces = list(handle.output(timeout=DEADLINE))
        assert _joined(pieces, "stdout") == b"to stdout\nno newline at the end"
        assert _joined(pieces, "stderr") == b"to stderr\n"
        assert handle.result(DEADLINE) == "done"


def test_all_output_arrives_before_the_result(shared_server: Server) -> None:
    """The wire order, seen by a bare socket: every `output` push, in
    order and complete, then `result`."""
    messages = _raw_job(shared_server.endpoint, "tests.output_tasks:marked", [3000])
    kinds = [m["kind"] for m in messages]
    assert "result" in kinds
    first_result = kinds.index("result")
    outputs = [m for m in messages if m["kind"] == "output"]
    assert outputs and all(kinds.index("output") < first_result for _ in outputs)
    assert all(k != "output" for k in kinds[first_result:])
    data = b"".join(m["data"] for m in outputs)
    assert data == b"".join(b"line %d\n" % n for n in range(3000))
    offsets = [m["offset"] for m in outputs]
    assert offsets == [sum(len(m["data"]) for m in outputs[:i]) for i in range(len(outputs))]


def test_big_output_to_a_slow_reader(shared_server: Server) -> None:
    """Several MB while the client reads nothing: the worker is not held
    up, nothing is lost, and the result comes."""
    size = 4 * 1024 * 1024
    with shared_server.client(timeout=DEADLINE) as client:
        handle = client.spawn("tests.output_tasks:flood", size)
        # Read nothing until the worker is gone: it was never blocked on us.
        info = handle.wait(DEADLINE)
        assert info.exit_code == 0
        written = handle.result(DEADLINE)
        data = _joined(list(handle.output(timeout=DEADLINE)), "stdout")
    assert written >= size and len(data) == written
    assert data.startswith(b"0" * 63 + b"\n") and data.endswith(b"%063d\n" % (written // 64 - 1))


# Its own server, not the shared one: there, under load (5-7 on 2 cores), its
# kept + dropped came ~64 KiB short of what was written in 3 of 11 runs of this
# module (with the unchanged tests, 1 run of 12 failed too, which test was not
# recorded); not explained yet.
def test_a_reader_loses_nothing_and_an_idle_client_keeps_a_bounded_tail(
    server: Server,
) -> None:
    """More than the 16 MiB an unread handle keeps: read as it comes, all of
    it arrives (ZeroMQ hands over what piled up, and none of it is dropped);
    left unread, the oldest is dropped and counted."""
    size = 20 * 1024 * 1024
    read = subprocess.run(
        [
            *ZYGOTE,
            "spawn",
            "--endpoint",
            server.endpoint,
            "tests.output_tasks:flood",
            str(size),
        ],
        stdout=subprocess.PIPE,
        timeout=60,
    )
    assert read.returncode == 0
    written = int(read.stdout.rsplit(b"\n", 2)[-2])
    assert len(read.stdout) == written + len(b"%d\n" % written)
    with server.client(timeout=DEADLINE) as client:
        handle = client.spawn("tests.output_tasks:flood", size)
        assert handle.result(DEADLINE) == written
        kept = len(_joined(list(handle.output(timeout=DEADLINE)), "stdout"))
    assert handle.output_dropped > 0 and kept + handle.output_dropped == written
    assert kept <= 16 * 1024 * 1024


def test_a_socket_that_stops_reading_does_not_block_the_worker(shared_server: Server) -> None:
    """A bare client whose receive queue holds one message and who reads
    nothing while 4 MB go out: the job still ends, and its result is there
    for the asking."""
    sock = _socket(shared_server.endpoint, rcvhwm=1)
    try:
        _send(
            sock,
            "spawn",
            req=1,
            task="tests.output_tasks:flood",
            handle="slowreader-1",
            payload=msgpack.packb([[4 * 1024 * 1024], {}]),
        )
        wait_until(
            lambda: "[slowreader-1] tests.output_tasks:flood exited" in shared_server.log(),
            timeout=DEADLINE,
            what="the flooding worker to end",
        )
        # As the Python client does (docs/protocol.md §8): ask again after a
        # second of silence; what was pushed while our queue was full is
        # sent again.
        deadline = time.monotonic() + DEADLINE
        for req in itertools.count(2):
            assert time.monotonic() < deadline, "no result"
            _send(sock, "attach", req=req, handle="slowreader-1")
            results = [m for m in _receive_while_talking(sock) if m["kind"] == "result"]
            if results:
                assert results[0]["outcome"] == "ok"
                break
    finally:
        sock.close()


def test_attach_later_gets_the_kept_tail(shared_server: Server, tmp_path: Path) -> None:
    """A detached job nobody follows: its output goes to the server's log
    (bounded, tagged with the job), its last 64 KiB are kept for `zygote
    result`, which prints them before the result."""
    count = 20000  # about 190 KB of "line N\n"
    task, go_on = "tests.output_tasks:wait_then_mark", tmp_path / "go-on"
    expected = b"".join(b"line %d\n" % n for n in range(count))
    out = zygote_cli(
        "spawn", "--endpoint", shared_server.endpoint, "--detach", task, str(go_on), str(count)
    )
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    go_on.touch()  # its client is gone by now: nobody follows the job
    wait_until(
        lambda: f"[{job}] {task} exited" in shared_server.log(),
        timeout=DEADLINE,
        what="the job to end",
    )
    log = shared_server.log()
    assert f"[{job}] stdout: line 0\n" in log
    assert f"[{job}] stdout: line {count - 1}\n" not in log  # over the bound
    assert "more bytes of output not logged" in log

    with shared_server.client(timeout=DEADLINE) as client:
        handle = client.attach(job)
        tail = _joined(list(handle.output(timeout=DEADLINE)), "stdout")
        assert tail == expected[-TAIL:]
        # Not collected by us: `zygote result` still finds it.

    out = zygote_cli("result", "--endpoint", shared_server.endpoint, job)
    assert out.returncode == 0, out.stderr
    assert out.stdout.encode() == expected[-TAIL:] + b"%d\n" % count


def test_aio_handle_output(shared_server: Server) -> None:
    async def main() -> tuple[list[tuple[str, bytes]], Any]:
        async with aio.Zygote(shared_server.endpoint, timeout=DEADLINE) as client:
            handle = await client.spawn("tests.output_tasks:both_streams")
            pieces = [piece async for piece in handle.output(timeout=DEADLINE)]
            return pieces, await handle.result(DEADLINE)

    pieces, value = asyncio.run(main())
    assert value == "done"
    assert _joined(pieces, "stdout") == b"to stdout\nno newline at the end"
    assert _joined(pieces, "stderr") == b"to stderr\n"


# -- a bare client (docs/protocol.md) -------------------------------------------


def _socket(endpoint: str, rcvhwm: int = 0) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.ROUTING_ID, b"z" + os.urandom(15))
    sock.connect(endpoint)
    return sock


def _send(sock: zmq.Socket[bytes], kind: str, **fields: Any) -> None:
    sock.send(msgpack.packb({"v": 1, "kind": kind, **fields}, use_bin_type=True))


def _receive_until(
    sock: zmq.Socket[bytes], done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while not seen or not done(seen[-1]):
        assert sock.poll(int(DEADLINE * 1000)), f"nothing within {DEADLINE}s after {seen[-3:]}"
        seen.append(msgpack.unpackb(sock.recv(), raw=False))
    return seen


def _receive_while_talking(sock: zmq.Socket[bytes], silence: float = 1.0) -> list[dict[str, Any]]:
    """Every message until the server has been silent for `silence` seconds."""
    seen = []
    while sock.poll(int(silence * 1000)):
        seen.append(msgpack.unpackb(sock.recv(), raw=False))
    return seen


def _raw_job(endpoint: str, task: str, args: list[Any]) -> list[dict[str, Any]]:
    """Every message a job's spawn brings, up to its `exited`."""
    sock = _socket(endpoint)
    try:
        payload = msgpack.packb([args, {}], use_bin_type=True)
        _send(sock, "spawn", req=1, task=task, payload=payload, handle=os.urandom(12).hex())
        return _receive_until(sock, lambda m: m["kind"] == "exited")
    finally:
        sock.close()
