"""The asyncio client against a real server: the same answers and errors as
the sync client, many coroutines sharing one client."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

import zygote.aio
import zygote.client
from zygote import ServerUnavailable, SpawnError, TaskError, TaskTimeout, WorkerLost, ZygoteTimeout
from zygote.aio import Zygote

from .conftest import Server


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 50))


def test_spawn_result_wait_and_stats(shared_server: Server) -> None:
    async def main() -> None:
        async with Zygote(shared_server.endpoint, timeout=30) as z:
            handle = await z.spawn("tests.tasks:add", 2, 3)
            assert handle.generation == 1 and handle.pid > 0
            assert await handle.result() == 5
            exit_info = await handle.wait()
            assert exit_info.exit_code == 0 and exit_info.description == "exited normally"
            assert (await z.stats())["completed"] >= 1
            assert await z.ping() > 0

    run(main())


def test_many_coroutines_share_one_client(shared_server: Server) -> None:
    async def main() -> list[Any]:
        async with Zygote(shared_server.endpoint, timeout=30) as z:

            async def one(i: int) -> Any:
                return await (await z.spawn("tests.tasks:slow_identity", i, 0.05)).result()

            return await asyncio.gather(*(one(i) for i in range(12)))

    assert run(main()) == list(range(12))


def test_map_in_order_and_left_early(shared_server: Server) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        async with Zygote(shared_server.endpoint, timeout=30) as z:
            whole = [v async for v in z.map("tests.tasks:identity", range(10), max_in_flight=3)]
            early = []
            async for value in z.map("tests.tasks:identity", range(10)):
                early.append(value)
                if len(early) == 2:
                    break
            return whole, early

    whole, early = run(main())
    assert whole == list(range(10)) and early == [0, 1]


def test_errors_are_the_sync_clients(shared_server: Server) -> None:
    async def main() -> None:
        async with Zygote(shared_server.endpoint, timeout=30) as z:
            with pytest.raises(TaskError, match="bad value") as raised:
                await (await z.spawn("tests.tasks:raise_value_error")).result()
            assert raised.value.exc_type == "ValueError" and raised.value.remote_traceback
            with pytest.raises(WorkerLost):
                await (await z.spawn("tests.tasks:segfault")).result()
            with pytest.raises(TaskTimeout):
                await (await z.spawn("tests.tasks:sleep", 10, _timeout=0.3)).result()
            sleeper = await z.spawn("tests.tasks:sleep", 10)
            with pytest.raises(ZygoteTimeout):
                await sleeper.result(timeout=0.2)
            assert await sleeper.kill(signal.SIGKILL) is True
            with pytest.raises(WorkerLost):
                await sleeper.result()
            assert await sleeper.kill() is False
            with pytest.raises(SpawnError, match="unknown profile"):
                await z.spawn("tests.tasks:add", 1, 2, _profile="nope")
            with pytest.raises(ValueError, match=r"package\.module:function"):
                await z.spawn("not a task")

    run(main())


def test_attach_from_another_client(shared_server: Server) -> None:
    async def main() -> Any:
        async with Zygote(shared_server.endpoint, timeout=30) as first:
            handle = await first.spawn("tests.tasks:sleep", 0.3, "late")
        async with Zygote(shared_server.endpoint, timeout=30) as second:
            return await (await second.attach(handle.id)).result()

    assert run(main()) == "late"


def test_a_server_gone_is_server_unavailable(
    start_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probes' timing shortened as in test_client.py's dead server test
    # (by default 1 s of silence, then 4 s without an answer); zygote.aio
    # has its own copies of the two names.
    for name, value in (("PROBE_EVERY", 0.2), ("PROBE_TIMEOUT", 0.5)):
        monkeypatch.setattr(zygote.client, name, value)
        monkeypatch.setattr(zygote.aio, name, value, raising=False)
    server = start_server()

    async def main() -> None:
        async with Zygote(server.endpoint) as z:  # no timeout: the probes decide
            handle = await z.spawn("tests.tasks:sleep", 30)
            os.kill(server.pid, signal.SIGKILL)
            with pytest.raises(ServerUnavailable, match="stopped answering"):
                await handle.result()

    run(main())


def test_a_result_right_behind_its_spawned_reply_is_not_dropped(tmp_path) -> None:
    # A scripted server (a raw ROUTER) answers a spawn with its reply and the
    # result in one burst, then goes silent. The client's reader files both
    # before the spawning coroutine runs again: the result must find the
    # job's record (made before the request left), not be dropped to be
    # fetched again by a probe after a second of silence (a 0.5 s wait
    # would then time out). Every fast task hit this; a map of 10 took 6 s.
    import msgpack
    import zmq

    from zygote.codec import decode_request, encode
    from zygote.protocol import OK, Ok, Ping, Result, Spawn, Spawned

    endpoint = f"ipc://{tmp_path}/scripted.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)

    def serve() -> None:
        while True:
            peer, data = router.recv_multipart()
            msg = decode_request(data)
            if isinstance(msg, Ping):
                info = {"server": "scripted", "max_workers": 2, "max_message_bytes": 1 << 20}
                router.send_multipart([peer, encode(Ok(msg.req, info))])
            elif isinstance(msg, Spawn):
                assert msg.handle is not None
                value = msgpack.packb(42)
                router.send_multipart([peer, encode(Spawned(msg.req, msg.handle, 4242, 1))])
                router.send_multipart([peer, encode(Result(msg.handle, OK, value=value))])
                return

    async def main() -> Any:
        serving = asyncio.get_running_loop().run_in_executor(None, serve)
        async with Zygote(endpoint, timeout=5) as z:
            handle = await z.spawn("tests.tasks:add", 40, 2)
            await serving
            return await handle.result(timeout=0.5)

    try:
        assert run(main()) == 42
    finally:
        router.close()
