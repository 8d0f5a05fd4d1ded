"""The asyncio client: `zygote.aio.Zygote`, the twin of `zygote.Zygote`, on
`zmq.asyncio`. Same server, same messages (docs/protocol.md), same errors.

One DEALER socket per client and one reader task: it files each reply under
its request id and each pushed `Result`/`Exited` under its job, so any number
of coroutines can wait on one client at once (unlike the sync client, which
is one per thread). While something waits, a server silent for a second is
probed (`Ping`, and `Attach` for the job waited on); one that stays silent
for four more, or that restarted, raises `ServerUnavailable`.

Not (yet) like the sync client: a spawn whose request was lost on the way
(a broken tcp connection) is not sent again under its name; it raises.

    async with zygote.aio.Zygote() as z:
        handle = await z.spawn("mymod:work", 1, 2)
        print(await handle.result())
        async for value in z.map("mymod:square", range(100)):
            ...
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import secrets
import signal as _signal
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from .aio_handle import Handle, _Job
from .client import PROBE_EVERY, PROBE_TIMEOUT
from .codec import check_spawn_size, decode_reply, encode, prepare_limits, prepare_spawn
from .config import default_endpoint
from .errors import ServerUnavailable, ZygoteError, ZygoteTimeout, error_for, silent_server
from .keys import HANDSHAKE_EVENTS, ClientKeys, Handshakes
from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Attach,
    Collected,
    Error,
    ErrorCode,
    Exited,
    Jobs,
    Kill,
    Message,
    Ok,
    Output,
    Ping,
    ProtocolError,
    Refork,
    Reload,
    Result,
    Spawn,
    Spawned,
    Stats,
    Stop,
)

__all__ = ["Handle", "Zygote"]


class Zygote:
    """An asyncio connection to a zygote server: `async with Zygote() as z`.
    The arguments are `zygote.Zygote`'s."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | None = None,
        curve_secret: str | None = None,
        curve_server: str | None = None,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self._keys = ClientKeys.for_client(curve_secret, curve_server)
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise ServerUnavailable(
                f"no zygote server at {self.endpoint} (is `zygote start` running?)"
            )
        self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)  # take in everything asked for
        self._socket.setsockopt(zmq.ROUTING_ID, b"a" + secrets.token_bytes(15))
        self._keys.apply(self._socket)
        self._monitor: zmq.asyncio.Socket | None = None
        if self.endpoint.startswith("tcp://"):  # see keys.HandshakeWatch
            self._monitor = self._socket.get_monitor_socket(HANDSHAKE_EVENTS)
        self._socket.connect(self.endpoint)
        self._requests = itertools.count(1)
        self._prefix = secrets.token_hex(12)  # 96 random bits: not guessable
        self._replies: dict[int, asyncio.Future[Message]] = {}
        self._jobs: weakref.WeakValueDictionary[str, _Job] = weakref.WeakValueDictionary()
        self._unwanted: set[str] = set()  # jobs whose results nobody will read
        self._reader: asyncio.Task[None] | None = None
        self._heard = 0.0  # when the server last said anything
        self._answered = False  # ... if it ever did
        self._server: str | None = None
        self._max_message = DEFAULT_MAX_MESSAGE_BYTES
        self._max_workers = 0
        self._broken: ZygoteError | None = None
        self._background: set[asyncio.Future[None]] = set()
        # What this turn of the event loop asked to send, sent at its end in
        # as few ZeroMQ messages as the server takes (its max_batch): the
        # spawns of a map's window together, and the turn's confirmations
        # (`Collected`) first, with them.
        self._outbox: list[bytes] = []
        self._to_confirm: list[str] = []
        self._flush_soon = False
        self._max_batch = 1

    async def __aenter__(self) -> Zygote:
        await self.ping()  # learns the server's identity and limits
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; jobs keep running (see `attach()`)."""
        if self._socket.closed:
            return
        self._flush()
        if self._reader is not None:
            self._reader.cancel()
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close()

    # -- the API ----------------------------------------------------------

    async def spawn(
        self,
        task: str,
        *args: Any,
        _timeout: float | None = None,
        _env: dict[str, str] | None = None,
        _cwd: str | None = None,
        _profile: str | None = None,
        _limits: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> Handle:
        """Run `task` in a new worker; returns once it runs (see `zygote.Zygote.spawn`)."""
        spawn = prepare_spawn(task, args, kwargs, _timeout, _env, _cwd, _profile)
        limits = prepare_limits(_limits)
        payload, env, cwd, size = spawn
        if self._server is None:
            await self.ping()
        check_spawn_size(size, self._max_message)
        # The job's record exists before the request leaves: its result may
        # arrive right behind the reply, before this coroutine runs again,
        # and the reader files it only where a record waits for it.
        expected: list[_Job] = []  # held here: the records are weakly kept

        def make(req: int) -> Spawn:
            name = self._name(req)
            expected.append(self._job(name, 0))
            return Spawn(req, task, payload, _timeout, env, cwd, name, _profile, limits)

        reply = await self._call(make)
        assert isinstance(reply, Spawned)
        return Handle(self, reply.handle, reply.pid, reply.generation, reply.warnings)

    async def map(
        self,
        task: str,
        iterable: Iterable[Any],
        *,
        max_in_flight: int | None = None,
        profile: str | None = None,
    ) -> AsyncIterator[Any]:
        """`task(item)` for every item, results in order, at most
        `max_in_flight` (default: the server's max-workers) running ahead."""
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self._server is None:
            await self.ping()
        window = max_in_flight or self._max_workers or 1
        items = iter(iterable)
        pending: list[asyncio.Task[Handle]] = []

        def fill() -> None:
            for item in itertools.islice(items, window - len(pending)):
                pending.append(asyncio.ensure_future(self.spawn(task, item, _profile=profile)))

        fill()
        try:
            while pending:
                handle = await pending.pop(0)
                fill()
                yield await handle.result()
        finally:
            for spawning in pending:  # left early: nobody reads these results
                spawning.add_done_callback(self._unwanted_result)

    async def attach(self, handle_id: str) -> Handle:
        """A handle for a job spawned elsewhere (by another client)."""
        reply = await self._call(lambda req: Attach(req, handle_id))
        assert isinstance(reply, Spawned)
        return Handle(self, reply.handle, reply.pid, reply.generation, reply.warnings)

    async def jobs(self) -> list[dict[str, Any]]:
        """The jobs queued or running (see `zygote.Zygote.jobs`)."""
        reply = await self._call(lambda req: Jobs(req))
        assert isinstance(reply, Ok)
        return list(reply.info["jobs"])

    async def kill(self, handle_id: str, signal: int = _signal.SIGTERM) -> bool:
        """Signal a job's worker by its id; False if it is not queued or running."""
        try:
            await self._call(lambda req: Kill(req, handle_id, int(signal)))
        except (ZygoteTimeout, ServerUnavailable):
            raise
        except ZygoteError:  # the server's answer: no such job running
            return False
        return True

    async def stats(self) -> dict[str, Any]:
        reply = await self._call(lambda req: Stats(req))
        assert isinstance(reply, Ok)
        return reply.info

    async def ping(self) -> float:
        """Round-trip time to the server in seconds."""
        start = asyncio.get_running_loop().time()
        await self._call(lambda req: Ping(req), self.timeout or 10.0)
        return asyncio.get_running_loop().time() - start

    async def refork(self, profile: str | None = None) -> int:
        """See `zygote.Zygote.refork`."""
        reply = await self._call(lambda req: Refork(req, profile))
        assert isinstance(reply, Ok)
        return int(reply.info["generation"])

    async def reload(self, profile: str | None = None) -> int:
        """See `zygote.Zygote.reload`."""
        reply = await self._call(lambda req: Reload(req, profile))
        assert isinstance(reply, Ok)
        return int(reply.info["generation"])

    async def stop(self) -> None:
        """Ask the server to stop gracefully."""
        await self._call(lambda req: Stop(req), self.timeout or 10.0)

    # -- the machinery ------------------------------------------------------

    def _name(self, req: int) -> str:
        return f"{self._prefix}-{req}"

    def _job(self, handle_id: str, pid: int) -> _Job:
        job = self._jobs.get(handle_id)
        if job is None:
            job = self._jobs[handle_id] = _Job(pid)
        job.pid = job.pid or pid  # made before the spawn's reply: pid 0 until then
        return job

    async def _call(self, make: Any, timeout: float | None = None) -> Message:
        """Send a request and wait for its reply; raise it if it is an error."""
        if self._socket.closed:
            raise ZygoteError("this client is closed")
        loop = asyncio.get_running_loop()
        if self._reader is None:
            self._heard = loop.time()
            self._reader = loop.create_task(self._read())
            if self._monitor is not None:
                watching = loop.create_task(self._watch_handshakes(self._monitor))
                self._background.add(watching)
        req = next(self._requests)
        future: asyncio.Future[Message] = loop.create_future()
        self._replies[req] = future
        try:
            self._post(encode(make(req)))
            timeout = self.timeout if timeout is None else timeout
            reply: Message = await self._wait(asyncio.shield(future), timeout)
        finally:
            self._replies.pop(req, None)
        if isinstance(reply, Error):
            raise error_for(reply.code, reply.message, reply.reasons)
        return reply

    async def _wait(self, awaitable: Any, timeout: float | None, follow: str | None = None) -> Any:
        """Await `awaitable` within `timeout` (ZygoteTimeout), probing the
        server whenever it has been silent for PROBE_EVERY."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                if self._broken is not None:
                    raise self._broken
                wait = PROBE_EVERY
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise ZygoteTimeout(f"no answer from the server within {timeout:g}s")
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    return task.result()
                if loop.time() - self._heard >= PROBE_EVERY:
                    await self._probe(follow)
        finally:
            if not task.done():
                task.cancel()

    async def _probe(self, follow: str | None) -> None:
        """Ask a silent server whether it is there (and, for `follow`, to push
        that job's messages again); raise ServerUnavailable if it says nothing."""
        loop = asyncio.get_running_loop()
        asked = loop.time()
        self._post(encode(Ping(next(self._requests))))
        if follow is not None:
            req = next(self._requests)
            self._replies[req] = reply = loop.create_future()
            reply.add_done_callback(functools.partial(self._followed, follow))
            self._post(encode(Attach(req, follow)))
        while self._heard < asked:
            if self._broken is not None:
                raise self._broken
            if loop.time() - asked >= PROBE_TIMEOUT:
                raise silent_server(self.endpoint, self._answered, loop.time() - self._heard)
            await asyncio.sleep(0.05)

    def _followed(self, handle_id: str, reply: asyncio.Future[Message]) -> None:
        msg = reply.result() if not reply.cancelled() else None
        job = self._jobs.get(handle_id)
        if isinstance(msg, Error) and msg.code == ErrorCode.UNKNOWN_HANDLE and job is not None:
            job.lost(handle_id, msg.message)

    async def _confirm(self, handle_id: str, job: _Job) -> None:
        if not job.collected and not self._socket.closed:
            job.collected = True
            self._to_confirm.append(handle_id)
            self._schedule_flush()

    def _post(self, frame: bytes) -> None:
        """Send `frame` at the end of this turn of the event loop."""
        self._outbox.append(frame)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        frames, self._outbox = self._outbox, []
        if self._to_confirm:
            frames.insert(0, encode(Collected(self._to_confirm)))
            self._to_confirm = []
        if self._socket.closed:
            return
        for start in range(0, len(frames), self._max_batch):
            chunk = frames[start : start + self._max_batch]
            send = (
                self._socket.send_multipart(chunk)
                if len(chunk) > 1
                else self._socket.send(chunk[0])
            )
            asyncio.ensure_future(send).add_done_callback(_sent)

    def _unwanted_result(self, spawning: asyncio.Task[Handle]) -> None:
        if spawning.cancelled() or spawning.exception() is not None:
            return
        handle = spawning.result()
        if handle.done():
            confirming = asyncio.ensure_future(self._confirm(handle.id, handle._job))
            self._background.add(confirming)  # held until done: tasks are weakly kept
            confirming.add_done_callback(self._background.discard)
        else:
            self._unwanted.add(handle.id)

    async def _read(self) -> None:
        """The reader task: file every message that arrives."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self._socket.recv()
                msg = decode_reply(data)
            except asyncio.CancelledError:
                raise
            except ProtocolError as exc:
                self._fail(ZygoteError(f"the server at {self.endpoint} sent garbage: {exc}"))
                return
            except zmq.ZMQError:
                return  # closed
            self._heard, self._answered = loop.time(), True
            if isinstance(msg, Result | Exited | Output):
                job = self._jobs.get(msg.handle)
                if job is not None:
                    job.take(msg)
                elif isinstance(msg, Result) and msg.handle in self._unwanted:
                    self._unwanted.discard(msg.handle)
                    self._to_confirm.append(msg.handle)
                    self._schedule_flush()
                continue
            if isinstance(msg, Ok) and "server" in msg.info:
                self._learn(msg.info)
            future = self._replies.pop(msg.req, None)
            if future is not None and not future.done():
                future.set_result(msg)

    async def _watch_handshakes(self, monitor: zmq.asyncio.Socket) -> None:
        """On tcp: a refused handshake fails every wait at once, saying why."""
        handshakes = Handshakes(self._keys, self.endpoint)
        while True:
            try:
                event = await recv_monitor_message(monitor)
            except zmq.ZMQError:
                return  # closed
            before = handshakes.error
            error = handshakes.saw(event["event"], event["value"])
            if error is None and before is not None and self._broken is before:
                self._broken = None
            elif error is not None and error is not before:
                self._fail(error)

    def _learn(self, info: dict[str, Any]) -> None:
        server = info["server"]
        if self._server is not None and server != self._server:
            self._fail(
                ServerUnavailable(
                    f"the server at {self.endpoint} restarted: requests in flight were lost"
                )
            )
        self._server = server
        self._max_message = info.get("max_message_bytes", self._max_message)
        self._max_workers = info.get("max_workers", self._max_workers)
        self._max_batch = max(1, int(info.get("max_batch", 1)))

    def _fail(self, error: ZygoteError) -> None:
        """Everything waiting now fails with `error` (it is not retried)."""
        self._broken = error
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)
        self._replies.clear()
        self._broken = None if isinstance(error, ServerUnavailable) else error


def _sent(sending: asyncio.Future[Any]) -> None:
    """A send's outcome, taken so that asyncio does not log it: a send on a
    closed socket fails, and what waited for its reply hears of the close."""
    if not sending.cancelled():
        sending.exception()
