"""The Python client: pipelining, map, attach, and a server that goes away."""

from __future__ import annotations

import os
import select
import signal

import msgpack
import pytest

from zygote import ServerUnavailable, SpawnError, TaskError, Zygote, ZygoteError
from zygote import client as client_module
from zygote.codec import decode_reply, decode_request, encode
from zygote.protocol import Collected, Error, Result, Spawn, Spawned

from .conftest import Server, wait_until


def test_many_handles_in_one_client_complete_out_of_order(shared_client: Zygote) -> None:
    slow = shared_client.spawn("tests.tasks:sleep", 0.5, "slow")
    fast = shared_client.spawn("tests.tasks:sleep", 0.0, "fast")
    assert fast.result() == "fast"
    assert not slow.done()
    assert slow.result() == "slow"


def test_fileno_wakes_a_poll_loop_for_each_result(shared_client: Zygote) -> None:
    # Edge-triggered: every wake is followed by done(), which drains the
    # socket and re-arms it; a result must never be left unseen behind it.
    poller = select.poll()
    poller.register(shared_client.fileno(), select.POLLIN)
    for n in range(5):
        handle = shared_client.spawn("tests.tasks:sleep", 0.05, n)
        while not handle.done():
            # The job takes 50 ms: a poll that times out missed its result.
            assert poller.poll(20_000), f"job {n}: its result never woke the poll"
        assert handle.result() == n


def test_map_keeps_order_and_bounds_in_flight(shared_server: Server) -> None:
    client = shared_server.client(timeout=60)
    completed = client.stats()["completed"]
    values = list(client.map("tests.tasks:slow_identity", range(20), max_in_flight=3))
    assert values == list(range(20))
    # Results arrive before the workers' exits are processed.
    wait_until(
        lambda: shared_server.stats()["completed"] == completed + 20, what="20 completed workers"
    )


def test_map_with_a_busy_consumer_loses_nothing(shared_server: Server) -> None:
    # 800 jobs in flight make 2400 messages (Spawned, Result, Exited) while
    # the caller reads none: more than ZeroMQ's default queue bounds on both
    # sides (1000 each), past which the server would have to drop replies.
    client = shared_server.client(timeout=60)
    completed = client.stats()["completed"]
    results = client.map("tests.tasks:identity", range(800), max_in_flight=800, timeout=40)
    wait_until(
        lambda: shared_server.stats()["completed"] == completed + 800, timeout=60, what="800 jobs"
    )
    assert list(results) == list(range(800))


def test_map_raises_at_the_failing_item(shared_client: Zygote) -> None:
    results = shared_client.map("tests.tasks:raise_value_error", ["a"], max_in_flight=2)
    with pytest.raises(TaskError, match="a"):
        next(results)
    mixed = shared_client.map("tests.tasks:identity", [1, 2, 3])
    assert list(mixed) == [1, 2, 3]


def test_map_default_window_is_the_servers_max_workers(shared_client: Zygote) -> None:
    assert list(shared_client.map("tests.tasks:identity", range(10))) == list(range(10))
    assert shared_client._max_workers == 4


def test_new_client_collects_result_by_handle_id(shared_server: Server, tmp_path) -> None:
    go = tmp_path / "go"
    with shared_server.client(timeout=20) as first:
        handle = first.spawn("tests.tasks:wait_for_file", str(go))
        handle_id, pid = handle.id, handle.pid
    go.write_text("go")  # it finishes while nobody is connected
    wait_until(lambda: shared_server.stats()["results_kept"] == 1, what="the result to be kept")
    with shared_server.client(timeout=20) as second:
        again = second.attach(handle_id)
        assert again.pid == pid
        assert again.result() == pid
        assert again.wait().exit_code == 0
    # Delivered: the server does not keep it any longer.
    with (
        shared_server.client(timeout=20) as third,
        pytest.raises(ZygoteError, match="unknown handle"),
    ):
        third.attach(handle_id)


def test_a_result_sent_but_not_confirmed_is_kept(shared_server: Server, shared_raw) -> None:
    # A client that had the result on the wire when it went away (closing
    # its socket throws away what ZeroMQ had queued for it, or it crashed
    # before confirming): the server still has the result for a new client.
    sock = shared_raw
    payload = msgpack.packb([[7], {}])
    sock.send(encode(Spawn(1, "tests.tasks:identity", payload)))
    spawned = decode_reply(sock.recv())
    assert isinstance(spawned, Spawned)
    result = decode_reply(sock.recv())
    assert isinstance(result, Result) and result.handle == spawned.handle
    sock.close()  # without a Collected message
    assert shared_server.stats()["results_kept"] == 1
    with shared_server.client(timeout=20) as second:
        assert second.attach(spawned.handle).result() == 7
    assert shared_server.stats()["results_kept"] == 0


def test_a_result_whose_handle_was_dropped_stays_for_attach(shared_server: Server) -> None:
    client = shared_server.client(timeout=20)
    completed = client.stats()["completed"]
    handle_id = client.spawn("tests.tasks:identity", "kept").id  # the Handle is gone
    wait_until(
        lambda: shared_server.stats()["completed"] == completed + 1, what="the worker to end"
    )
    # On our connection the result came before this reply, and went unread.
    assert client.stats()["results_kept"] == 1
    with shared_server.client(timeout=20) as other:
        assert other.attach(handle_id).result() == "kept"


def test_close_leaves_unread_results_on_the_server(shared_server: Server, tmp_path) -> None:
    # close() makes a round trip to flush its last confirmation; a result
    # read meanwhile was never handed to user code: another process gets it.
    go = tmp_path / "go"
    client = shared_server.client(timeout=20)
    completed = client.stats()["completed"]
    handle = client.spawn("tests.tasks:wait_for_file", str(go))
    assert client.spawn("tests.tasks:add", 1, 2).result() == 3  # a confirmation pending
    go.write_text("go")
    wait_until(
        lambda: shared_server.stats()["completed"] == completed + 2, what="both workers to end"
    )
    client.close()
    with shared_server.client(timeout=20) as other:
        assert other.attach(handle.id).result() == handle.pid


class LossySocket:
    """The client's real socket, but the first message `lose` picks is lost
    on the way (a TCP connection that broke, a queue that overflowed)."""

    def __init__(self, sock, lose_sent=None, lose_received=None) -> None:
        self._sock, self._lose_sent, self._lose_received = sock, lose_sent, lose_received
        self.lost: list[object] = []

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def send(self, data, *args, **kwargs):
        if self._lose_sent and not self.lost and self._lose_sent(decode_request(data)):
            self.lost.append(decode_request(data))
            return None
        return self._sock.send(data, *args, **kwargs)

    def send_multipart(self, frames, *args, **kwargs):
        # A batch of requests (one ZeroMQ message) is lost whole.
        if self._lose_sent and not self.lost:
            picked = [msg for msg in map(decode_request, frames) if self._lose_sent(msg)]
            if picked:
                self.lost += picked
                return None
        return self._sock.send_multipart(frames, *args, **kwargs)

    def recv(self, *args, **kwargs):
        data = self._sock.recv(*args, **kwargs)
        if self._lose_received and not self.lost and self._lose_received(decode_reply(data)):
            self.lost.append(decode_reply(data))
            data = self._sock.recv(*args, **kwargs)  # zmq.Again if nothing else came
        return data


def test_a_lost_spawned_reply_is_recovered_without_running_twice(shared_server: Server) -> None:
    client = shared_server.client(timeout=20)
    accepted = client.stats()["accepted"]
    lossy = client._socket = client._requests.socket = LossySocket(  # type: ignore[assignment]
        client._socket, lose_received=lambda msg: isinstance(msg, Spawned)
    )
    handle = client.spawn("tests.tasks:identity", 5)  # the probe asks after it
    assert len(lossy.lost) == 1 and lossy.lost[0].handle == handle.id
    assert handle.result() == 5
    assert client.stats()["accepted"] == accepted + 1


def test_a_spawn_that_never_arrived_is_sent_again(shared_server: Server) -> None:
    client = shared_server.client(timeout=20)
    accepted = client.stats()["accepted"]
    lossy = client._socket = client._requests.socket = LossySocket(  # type: ignore[assignment]
        client._socket, lose_sent=lambda msg: isinstance(msg, Spawn)
    )
    handle = client.spawn("tests.tasks:identity", 6)  # unknown to the server: sent again
    assert len(lossy.lost) == 1 and lossy.lost[0].handle == handle.id
    assert handle.result() == 6
    assert client.stats()["accepted"] == accepted + 1


def test_a_spawn_sent_twice_under_one_name_runs_once(shared_server: Server, shared_raw) -> None:
    sock = shared_raw
    accepted = shared_server.stats()["accepted"]
    payload = msgpack.packb([[1], {}])
    sock.send(encode(Spawn(1, "tests.tasks:slow_identity", payload, handle="mine-1")))
    sock.send(encode(Spawn(2, "tests.tasks:slow_identity", payload, handle="mine-1")))
    replies = [decode_reply(sock.recv()) for _ in range(3)]  # 2 Spawned, 1 Result
    spawned = [r for r in replies if isinstance(r, Spawned)]
    assert sorted(r.req for r in spawned) == [1, 2]
    assert {r.handle for r in spawned} == {"mine-1"} and len({r.pid for r in spawned}) == 1
    assert shared_server.stats()["accepted"] == accepted + 1


def test_a_spawn_sent_again_after_its_job_ended_is_not_run_again(
    shared_server: Server, shared_raw
) -> None:
    before = shared_server.stats()
    spawn = Spawn(1, "tests.tasks:identity", msgpack.packb([[1], {}]), handle="once-1")
    shared_raw.send(encode(spawn))
    assert isinstance(decode_reply(shared_raw.recv()), Spawned)
    assert isinstance(decode_reply(shared_raw.recv()), Result)
    shared_raw.send(encode(Collected(["once-1"])))
    wait_until(
        lambda: shared_server.stats()["completed"] == before["completed"] + 1,
        what="the worker to end",
    )
    shared_raw.send(encode(Spawn(2, spawn.task, spawn.payload, handle="once-1")))
    reply = decode_reply(shared_raw.recv())
    while not isinstance(reply, Error):  # the exit report may come first
        reply = decode_reply(shared_raw.recv())
    assert reply.req == 2 and "already ended" in reply.message
    assert "result was collected" in reply.message
    assert shared_server.stats()["accepted"] == before["accepted"] + 1


def test_results_of_spawns_nobody_waits_for_are_not_kept(shared_server: Server) -> None:
    client = shared_server.client(timeout=20)
    completed = client.stats()["completed"]
    results = client.map("tests.tasks:slow_identity", range(4), max_in_flight=4)
    assert next(results) == 0
    results.close()  # the caller leaves: three jobs run on, unseen
    wait_until(lambda: shared_server.stats()["completed"] == completed + 4, what="all four jobs")
    client.ping()  # takes in their results (pushed before this reply)
    assert client.stats()["results_kept"] == 0


def test_attach_while_running_gets_the_result_too(shared_server: Server, tmp_path) -> None:
    go = tmp_path / "go"
    first = shared_server.client(timeout=20)
    handle = first.spawn("tests.tasks:wait_for_file", str(go))
    second = shared_server.client(timeout=20).attach(handle.id)
    go.write_text("go")
    assert second.result() == handle.pid
    assert handle.result() == handle.pid


def test_big_arguments_travel_down_the_channel(shared_client: Zygote) -> None:
    blob = os.urandom(3 * 1024 * 1024)
    assert shared_client.spawn("tests.tasks:identity", blob).result() == blob


def test_dead_server_is_detected_not_waited_on_forever(server: Server, monkeypatch) -> None:
    monkeypatch.setattr(client_module, "PROBE_EVERY", 0.2)
    monkeypatch.setattr(client_module, "PROBE_TIMEOUT", 0.5)
    client = server.client()
    handle = client.spawn("tests.tasks:sleep", 60)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ServerUnavailable, match="stopped answering"):
            handle.result()
    finally:
        os.kill(server.pid, signal.SIGCONT)


def test_restarted_server_is_noticed(start_server, tmp_path) -> None:
    endpoint = f"ipc://{tmp_path}/restart.sock"
    first = start_server(endpoint=endpoint)
    client = first.client(timeout=30)
    handle = client.spawn("tests.tasks:sleep", 60)
    os.kill(first.pid, signal.SIGKILL)
    first.wait_exit()
    start_server(endpoint=endpoint)
    with pytest.raises((ServerUnavailable, ZygoteError)):
        handle.result(timeout=20)


def test_after_a_restart_nothing_asked_of_the_old_server_reaches_the_new_one(
    start_server, tmp_path
) -> None:
    endpoint = f"ipc://{tmp_path}/restart.sock"
    first = start_server("--max-workers", "1", endpoint=endpoint)
    client = first.client(timeout=30)
    client.spawn("tests.tasks:sleep", 60)  # the only slot
    queued = client.map("tests.tasks:identity", ["old"])  # sent at once, and queued
    wait_until(lambda: first.stats()["queued"] == 1, what="a queued request")
    os.kill(first.pid, signal.SIGKILL)
    first.wait_exit()
    start_server(endpoint=endpoint)
    with pytest.raises(ServerUnavailable, match="restarted"):
        next(queued)  # its probe meets the new server
    # The same client goes on with the new server, and the old request (its
    # probe's "unknown handle" still unread) is not sent to it again.
    assert client.spawn("tests.tasks:identity", "new").result() == "new"
    assert client.stats()["accepted"] == 1


def test_no_server_at_endpoint(tmp_path) -> None:
    with pytest.raises(ServerUnavailable, match="no zygote server"):
        Zygote(f"ipc://{tmp_path}/nothing.sock")


def test_graceful_stop_errors_queued_and_lets_running_finish(start_server, tmp_path) -> None:
    server = start_server("--max-workers", "1")
    client = server.client(timeout=30)
    go = tmp_path / "go"
    running = client.spawn("tests.tasks:wait_for_file", str(go))
    queued = client.map("tests.tasks:identity", [1], max_in_flight=1)
    wait_until(lambda: server.stats()["queued"] == 1, what="a queued request")
    with server.client(timeout=10) as other:
        other.stop()
    with pytest.raises(SpawnError, match="server shutting down"):
        next(queued)
    with server.client(timeout=10) as late, pytest.raises(SpawnError, match="shutting down"):
        late.spawn("tests.tasks:add", 1, 1)
    assert server.process.poll() is None  # still waiting for the running worker
    go.write_text("go")
    assert running.result() == running.pid
    assert server.wait_exit(30) == 0
