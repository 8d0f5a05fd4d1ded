"""Several protocol messages in one ZeroMQ message (issue 14): a client's
batch of requests, the server's replies to it together, a map's window of
spawns in one message, confirmations riding with the next request."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import msgpack

from zygote import ZygoteError, aio
from zygote.codec import decode_reply, encode
from zygote.protocol import Error, Ok, Ping, Result, Spawn, Spawned, Stats

from .conftest import Server, wait_until


def _traffic(server: Server) -> dict[str, int]:
    return dict(server.stats()["client_traffic"])


def test_a_batch_is_answered_in_order_in_one_message(server: Server, raw) -> None:
    raw.send_multipart([encode(Ping(1)), b"\xc1", encode(Stats(3))])
    replies = [decode_reply(frame) for frame in raw.recv_multipart()]
    assert [type(r) for r in replies] == [Ok, Error, Ok]
    assert replies[0].req == 1 and replies[2].req == 3  # type: ignore[attr-defined]
    assert replies[1].code == "bad_request"  # type: ignore[attr-defined]
    assert "max_batch" in replies[0].info and "client_traffic" in replies[2].info  # type: ignore[attr-defined]


def test_a_batch_of_spawns_runs_each_once(server: Server, raw) -> None:
    spawns = [
        Spawn(n, "tests.tasks:add", msgpack.packb([[n, 100], {}]), handle=f"batch-{n}")
        for n in range(1, 6)
    ]
    raw.send_multipart([encode(spawn) for spawn in spawns])
    spawned: dict[str, int] = {}
    results: dict[str, Any] = {}
    while len(results) < len(spawns) or len(spawned) < len(spawns):
        for frame in raw.recv_multipart():
            reply = decode_reply(frame)
            if isinstance(reply, Spawned):
                spawned[reply.handle] = reply.req
            elif isinstance(reply, Result):
                assert reply.value is not None
                results[reply.handle] = msgpack.unpackb(reply.value)
    assert spawned == {f"batch-{n}": n for n in range(1, 6)}
    assert results == {f"batch-{n}": n + 100 for n in range(1, 6)}
    assert server.stats()["accepted"] == 5


def test_a_plain_spawns_result_is_confirmed_at_once(server: Server) -> None:
    # Nothing says another request will follow: held back, the result would
    # stay on the server for as long as this client sits idle.
    before = _traffic(server)
    with server.client(timeout=30) as client:
        client.ping()
        for n in range(5):
            assert client.spawn("tests.tasks:identity", n).result() == n
        wait_until(lambda: server.stats()["results_kept"] == 0, what="the confirmations")
        during = _traffic(server)
    assert during["received"] - before["received"] == during["received_in"] - before["received_in"]


def test_map_sends_its_window_in_one_message(server: Server) -> None:
    before = _traffic(server)
    with server.client(timeout=30) as client:
        assert list(client.map("tests.tasks:identity", range(30), max_in_flight=4)) == list(
            range(30)
        )
        # The last window's confirmations went when the map ended.
        wait_until(lambda: server.stats()["results_kept"] == 0, what="the last confirmations")
        after = _traffic(server)
    received = after["received"] - before["received"]
    messages = after["received_in"] - before["received_in"]
    # The first 4 spawns together, then each spawn with the confirmation of
    # the result consumed before it (26 of them).
    assert received - messages >= 3 + 26, (received, messages)


def test_the_asyncio_map_sends_its_window_in_one_message(server: Server) -> None:
    before = _traffic(server)

    async def run() -> list[Any]:
        async with aio.Zygote(server.endpoint, timeout=30) as client:
            return [value async for value in client.map("tests.tasks:identity", range(12))]

    assert asyncio.run(run()) == list(range(12))
    after = _traffic(server)
    received = after["received"] - before["received"]
    messages = after["received_in"] - before["received_in"]
    assert received - messages >= 3, (received, messages)  # max-workers 4: the first 4 together
    wait_until(lambda: server.stats()["results_kept"] == 0, what="the confirmations")


def test_a_req_style_message_carries_one_request(server: Server, raw) -> None:
    # A REQ socket could never read several answers: nothing of it runs.
    spawn = Spawn(1, "tests.tasks:add", msgpack.packb([[1, 2], {}]), handle="req-two")
    raw.send_multipart([b"", encode(spawn), encode(Ping(2))])
    raw.send(encode(Ping(3)))
    assert decode_reply(raw.recv()).req == 3  # type: ignore[attr-defined]
    assert server.stats()["accepted"] == 0
    assert "a REQ-style message with several requests" in server.log()


def test_a_map_dropped_unfinished_lets_the_server_forget_its_results_at_once(
    server: Server,
) -> None:
    # Without the cycle collector: dropping the map must be enough for the
    # results of its jobs not consumed to be confirmed unseen, as they come.
    gc.disable()
    try:
        with server.client(timeout=30) as client:
            for _ in client.map("tests.tasks:identity", range(4), max_in_flight=4):
                break
            client.map("tests.tasks:identity", range(3))  # never iterated at all
            closed = client.map("tests.tasks:identity", range(2))
            closed.close()  # never iterated, closed, and still referenced
            assert client.spawn("tests.tasks:add", 1, 1).result() == 2

            def forgotten() -> bool:
                client.ping()  # takes in (and confirms) what has come meanwhile
                return bool(server.stats()["results_kept"] == 0)

            wait_until(forgotten, what="the server to forget the map's results")
    finally:
        gc.enable()


def test_a_map_left_early_holds_back_no_other_confirmation(server: Server) -> None:
    with server.client(timeout=30) as client:
        for _ in client.map("tests.tasks:identity", range(4), max_in_flight=1):
            break  # the map is left unfinished: its generator is not closed yet
        handle = client.spawn("tests.tasks:add", 1, 1)
        assert handle.result() == 2
        handle.wait()
        # Confirmed at once: the server forgets the job once it has exited.
        with server.client(timeout=30) as other:

            def forgotten() -> bool:
                try:
                    other.attach(handle.id)
                except ZygoteError as exc:
                    return "result was collected" in str(exc)
                return False

            wait_until(forgotten, what="the plain spawn's confirmation")
