"""The Python client: `Zygote` talks to a server (`Handle`, in `handle.py`,
follows one job).

One ZeroMQ DEALER socket per client; not thread-safe (use one client per
thread). Requests are pipelined: replies are matched by request id, and the
server pushes each job's result and exit report to the clients that follow
it, so `spawn(...).result()` costs one round trip plus the job itself.

While it waits, a client probes the server every second of silence; a
server that stops answering, or that restarted (and so forgot our
requests), raises `ServerUnavailable` instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal as _signal
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zmq

from .batch import Batch, Call
from .codec import check_spawn_size, decode_reply, encode, prepare_limits, prepare_spawn
from .config import default_endpoint
from .errors import ServerUnavailable, ZygoteError, ZygoteTimeout, error_for, silent_server
from .handle import Delivery, ExitInfo, Handle, Link
from .keys import ClientKeys, HandshakeWatch
from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Attach,
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
from .requests import CONFIRM_AT_ONCE, Requests

__all__ = ["ExitInfo", "Handle", "Zygote"]

#: Probe a silent server after this long, and give up on it when a probe
#: stays unanswered for PROBE_TIMEOUT.
PROBE_EVERY = 1.0
PROBE_TIMEOUT = 4.0
#: How long `close()` waits for the server to confirm it read our last message.
_CLOSE_TIMEOUT = 1.0


class Zygote:
    """A connection to a zygote server. Use as a context manager or `close()`.

    `endpoint` defaults to `$ZYGOTE_ENDPOINT`, then the server's default
    ipc socket. `timeout` bounds every wait for the server (None: no bound,
    but a server that stops answering is still detected). On a tcp endpoint
    with CURVE, `curve_secret` is our NAME.key_secret file and `curve_server`
    the server's public NAME.key (defaults: `$ZYGOTE_CURVE_SECRET`,
    `$ZYGOTE_CURVE_SERVER`); a refused handshake raises ZygoteError
    ("authentication failed ...") at the next wait or send.
    """

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
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://") :]
            if not os.path.exists(path):
                raise ServerUnavailable(
                    f"no zygote server at {self.endpoint} (is `zygote start` running?)"
                )
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # No receive bound: ZeroMQ's I/O thread then takes in every reply
        # while our caller is busy elsewhere (say, between map() items). With
        # the default bound the server's queue for us fills up, and it has to
        # drop what it cannot send. What we take in is what we asked for.
        self._socket.setsockopt(zmq.RCVHWM, 0)
        # A name of our own: if the connection drops and comes back, the
        # server (ROUTER_HANDOVER) still knows where our replies go.
        self._socket.setsockopt(zmq.ROUTING_ID, b"z" + secrets.token_bytes(15))
        self._keys.apply(self._socket)
        # A refused handshake is silent on the data socket (libzmq retries):
        # its monitor says why, at once, instead of a timeout later.
        self._handshakes = HandshakeWatch(self._socket, self._keys, self.endpoint)
        self._socket.connect(self.endpoint)
        self._requests = Requests(self._socket, self._wait_for_room)
        self._answered = False  # has the server ever said anything?
        self._replies: dict[int, Message | Handle] = {}
        self._abandoned: set[int] = set()
        # What the server pushed for each job a handle still follows.
        self._deliveries: weakref.WeakValueDictionary[str, Delivery] = weakref.WeakValueDictionary()
        self._link = Link(self._receive_ready, self._wait, self._confirm, self._kill)
        self._server: str | None = None
        self._max_message = DEFAULT_MAX_MESSAGE_BYTES
        self._max_workers: int | None = None
        self._followed: dict[int, str] = {}  # Attach probes: request id -> handle
        # We name our jobs (`_handle_for`), so a spawn whose reply went missing
        # can be asked after, and sent again if it never arrived: handle ->
        # (request id, message), until its Spawned or Error is here. 96
        # random bits: on a shared server nobody finds our jobs by guessing.
        self._job_prefix = secrets.token_hex(12)
        self._spawns: dict[str, tuple[int, Callable[[int], Message]]] = {}
        self._unwanted: set[str] = set()  # handles of spawns nobody waits for
        # Learn the server's identity and limits along with the first request,
        # without waiting for it: a restart is then noticed by every probe.
        self._abandoned.add(self._send(lambda req: Ping(req)))

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. Jobs keep running; their results stay on the
        server for a new client to `attach()` to."""
        if self._socket.closed:
            return
        with contextlib.suppress(ZygoteError):  # never raises: unconfirmed results expire
            self._requests.send_confirmations()
            if self._requests.unproven is not None:
                # Our last `Collected` may still sit in ZeroMQ's queue, which
                # closing the socket throws away: the server would then keep
                # those results for nobody until they expire. One round trip
                # settles it (replies come in order), bounded for a dead server.
                self._call(lambda req: Ping(req), _CLOSE_TIMEOUT)
        self._handshakes.close()
        self._socket.close()

    # -- the API ----------------------------------------------------------

    def spawn(
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
        """Run `task` ("package.module:function") with the given arguments in a
        new worker; returns once the worker is ready and running it.

        `_timeout` kills the task after that many seconds, `_env` adds
        environment variables, `_cwd` sets its working directory, `_profile`
        picks the zygote lineage (`zygote start --profile NAME=...`) to fork
        it from, `_limits` lowers the server's worker limits for this job
        (`{"memory": bytes, "cpu_seconds": s, "nofile": n}`; running into
        one ends the job with `WorkerLost`, its `.limit` naming it).
        Arguments and the result travel as msgpack (tuples arrive as lists).
        """
        message = self._spawn_message(task, args, kwargs, _timeout, _env, _cwd, _profile, _limits)
        req = self._send_spawn(message)
        reply = self._reply(req, self.timeout, follow=self._handle_for(req))
        assert isinstance(reply, Handle)
        return reply

    def map(
        self,
        task: str,
        iterable: Iterable[Any],
        *,
        max_in_flight: int | None = None,
        timeout: float | None = None,
        profile: str | None = None,
    ) -> Iterator[Any]:
        """`task(item)` for every item, results in order, like `Executor.map`.

        At most `max_in_flight` jobs (default: the server's max-workers) are
        spawned ahead of the one being consumed; the first are spawned at
        once. A failed item raises its error when its turn comes; jobs
        already running then finish on their own. A KeyboardInterrupt while
        waiting (Ctrl-C) cancels the batch: its queued jobs never start, its
        running ones get SIGTERM. `timeout` bounds the whole run, counted
        from this call; `profile` is `spawn()`'s `_profile`.
        """
        calls: Iterable[Call] = (((item,), {}) for item in iterable)
        return Batch(self, task, calls, max_in_flight, timeout, profile, return_errors=False)

    def attach(self, handle_id: str) -> Handle:
        """A `Handle` for a job spawned elsewhere (say, by a client that has
        since gone away), to collect its result."""
        reply = self._call(lambda req: Attach(req, handle_id), self.timeout)
        assert isinstance(reply, Handle)
        return reply

    def jobs(self) -> list[dict[str, Any]]:
        """The jobs queued or running on the server (on a CURVE endpoint, those
        of our key): id, task, state, pid, profile, generation, seconds
        waited and run."""
        reply = self._call(lambda req: Jobs(req), self.timeout)
        assert isinstance(reply, Ok)
        return list(reply.info["jobs"])

    def kill(self, handle_id: str, signal: int = _signal.SIGTERM) -> bool:
        """Send `signal` to a job's worker (a queued job never starts); False
        if no such job is queued or running."""
        return self._kill(handle_id, int(signal))

    def fileno(self) -> int:
        """A descriptor to poll beside others: readable when messages *may*
        have come. ZeroMQ's, edge-triggered: call `Handle.done()` (it never
        blocks, and takes them in) before each poll of it."""
        return int(self._socket.getsockopt(zmq.FD))

    def stats(self) -> dict[str, Any]:
        """A snapshot of the server: workers, queue, zygote, counters."""
        reply = self._call(lambda req: Stats(req), self.timeout)
        assert isinstance(reply, Ok)
        return reply.info

    def ping(self) -> float:
        """Round-trip time to the server in seconds."""
        start = time.perf_counter()
        self._call(lambda req: Ping(req), self.timeout if self.timeout is not None else 10.0)
        return time.perf_counter() - start

    def refork(self, profile: str | None = None) -> int:
        """Promote a warm worker to be the next zygote generation: the next
        worker to finish its task successfully (waiting for one if none is
        running) becomes a zygote, and takes over new spawns and the ready
        pool once a child of it has passed the validators. Returns the new
        generation; raises ZygoteError with the reason if it failed (no task
        finished in time, a thread left behind, a failed validator)."""
        reply = self._call(lambda req: Refork(req, profile), self.timeout)
        assert isinstance(reply, Ok)
        return int(reply.info["generation"])

    def reload(self, profile: str | None = None) -> int:
        """Start the next generation from a fresh interpreter that imports
        the preload again (new code); it takes over once a child of it has
        passed the validators. Returns its number at once."""
        reply = self._call(lambda req: Reload(req, profile), self.timeout)
        assert isinstance(reply, Ok)
        return int(reply.info["generation"])

    def stop(self) -> None:
        """Ask the server to stop gracefully: it refuses new work, lets running
        workers finish, then exits."""
        self._call(lambda req: Stop(req), self.timeout if self.timeout is not None else 10.0)

    # -- plumbing ---------------------------------------------------------

    def _spawn_message(
        self,
        task: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        profile: str | None = None,
        limits: dict[str, float] | None = None,
    ) -> Callable[[int], Message]:
        payload, env, cwd, size = prepare_spawn(task, args, kwargs, timeout, env, cwd, profile)
        sent_limits = prepare_limits(limits)
        if size > 65536 and self._server is None:
            # Too big to guess: the server drops (and disconnects) anything
            # past its limit without a word, so learn the limit first.
            self._wait(lambda: self._server is not None, self.timeout or 10.0)
        check_spawn_size(size, self._max_message)
        return lambda req: Spawn(
            req, task, payload, timeout, env, cwd, self._handle_for(req), profile, sent_limits
        )

    def _send(self, make: Callable[[int], Message]) -> int:
        """Send one request (with the confirmations held back, if any)."""
        return self._send_many([make])[0]

    def _send_many(self, makes: list[Callable[[int], Message]]) -> list[int]:
        if self._socket.closed:
            raise ZygoteError("this client is closed")
        if len(makes) > 1 and self._server is None:
            # Whether the server takes batches is in its answer to our first
            # ping, usually here already: wait for it rather than guess (a
            # silent server is found out by the probes).
            self._wait(lambda: self._server is not None, self.timeout)
        return self._requests.send(makes)

    def _send_spawn(self, make: Callable[[int], Message]) -> int:
        return self._send_spawns([make])[0]

    def _send_spawns(self, makes: list[Callable[[int], Message]]) -> list[int]:
        reqs = self._send_many(makes)
        for req, make in zip(reqs, makes, strict=True):
            self._spawns[self._handle_for(req)] = (req, make)
        return reqs

    def _handle_for(self, req: int) -> str:
        return f"{self._job_prefix}-{req}"

    def _call(self, make: Callable[[int], Message], timeout: float | None) -> Message | Handle:
        return self._reply(self._send(make), timeout)

    def _reply(
        self, req: int, timeout: float | None, follow: str | None = None
    ) -> Message | Handle:
        """Wait for the reply to request `req`; raise it if it is an error.
        `follow`: the handle a spawn request named, for the probes."""
        try:
            self._wait(lambda: req in self._replies, timeout, follow)
        except BaseException:
            self._abandon(req)
            raise
        reply = self._replies.pop(req)
        if isinstance(reply, Error):
            raise error_for(reply.code, reply.message, reply.reasons)
        return reply

    def _wait(
        self, done: Callable[[], bool], timeout: float | None, follow: str | None = None
    ) -> None:
        """Take in messages until `done()`. A silent server is probed; when
        waiting on a handle (`follow`), the probe also asks the server to
        push that job's messages again, in case a full queue dropped them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        heard = time.monotonic()
        probe_sent: float | None = None
        while not done():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self._receive_ready()  # what has arrived by now still counts
                if done():
                    return
                raise ZygoteTimeout(f"no answer from the server within {timeout:g}s")
            if probe_sent is not None and now - probe_sent >= PROBE_TIMEOUT:
                raise silent_server(self.endpoint, self._answered, now - heard)
            wait = PROBE_EVERY if probe_sent is None else PROBE_TIMEOUT
            if deadline is not None:
                wait = min(wait, deadline - now)
            if self._handshakes.poll(max(1, int(wait * 1000))):
                self._receive_ready()
                heard, probe_sent = time.monotonic(), None
            elif probe_sent is None:
                probe_sent = time.monotonic()
                self._abandoned.add(self._send(lambda req: Ping(req)))
                if follow is not None:
                    req = self._send(lambda req: Attach(req, follow))
                    self._abandoned.add(req)
                    self._followed[req] = follow

    def _wait_for_room(self, since: float) -> None:
        """Wait for room to send a message (see `Requests.put`) as `_wait`
        waits for an answer: a failed handshake raises its error; past
        `timeout`, ZygoteTimeout; past an unanswered probe's time, the error
        of a silent server."""
        silent = PROBE_EVERY + PROBE_TIMEOUT
        bound = silent if self.timeout is None else min(self.timeout, silent)
        if self._handshakes.wait_for_room(since + bound):
            return
        if bound < silent:
            raise ZygoteTimeout(f"the server at {self.endpoint} took no message within {bound:g}s")
        raise silent_server(self.endpoint, self._answered, time.monotonic() - since)

    def _receive_ready(self) -> None:
        """Take in every message that has arrived, without blocking."""
        while True:
            try:
                data = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode_reply(data)
            except ProtocolError as exc:
                raise ZygoteError(f"the server at {self.endpoint} sent garbage: {exc}") from None
            self._answered = True
            self._take(msg)

    def _kill(self, handle_id: str, signal: int) -> bool:
        try:
            self._call(lambda req: Kill(req, handle_id, signal), self.timeout)
        except (ZygoteTimeout, ServerUnavailable):
            raise
        except ZygoteError:  # the server's answer: no running worker
            return False
        return True

    def _confirm(self, handle_id: str, delivery: Delivery) -> None:
        """The result of a job has reached user code: the server may forget
        it (said at once, or inside a map with its next spawn)."""
        if delivery.collected or self._socket.closed:
            return
        delivery.collected = True
        value = delivery.result.value if delivery.result is not None else None
        self._requests.confirm(handle_id, big=len(value or b"") >= CONFIRM_AT_ONCE)

    def _take(self, msg: Message) -> None:
        if isinstance(msg, (Result, Exited, Output)):
            delivery = self._deliveries.get(msg.handle)
            if delivery is not None:
                delivery.take(msg)
            elif isinstance(msg, Result) and msg.handle in self._unwanted:
                self._unwanted.discard(msg.handle)
                self._requests.confirm(msg.handle)
            return
        req: int = msg.req  # type: ignore[attr-defined]
        if isinstance(msg, Ok) and "server" in msg.info:
            self._learn(msg.info)
        followed = self._followed.pop(req, None)
        if followed is not None and isinstance(msg, Error) and msg.code == ErrorCode.UNKNOWN_HANDLE:
            self._forgotten(followed, msg.message)
        reply: Message | Handle = msg
        if isinstance(msg, Spawned):
            delivery = self._deliveries.get(msg.handle) or Delivery(msg.pid)
            self._deliveries[msg.handle] = delivery
            reply = Handle(self._link, msg.handle, msg.pid, msg.generation, msg.warnings, delivery)
            spawn = self._spawns.pop(msg.handle, None)
            if spawn is not None and spawn[0] != req:
                # The answer to a probe, for a spawn whose own reply was lost
                # (or is late: then it is dropped when it comes).
                self._file_reply(spawn[0], reply)
                self._abandoned.add(spawn[0])
        elif isinstance(msg, Error):
            self._spawns.pop(self._handle_for(req), None)  # if it answers a spawn
        # Replies come in order: one to a request sent after our last
        # `Collected` means the server has taken it in.
        self._requests.answered(req)
        self._file_reply(req, reply)

    def _abandon(self, req: int) -> None:
        """Nobody waits for the reply to `req` any longer. If it was a spawn,
        its job runs on unseen: its result is confirmed when it comes, so
        the server does not keep it for nobody."""
        reply = self._replies.pop(req, None)
        if reply is None:
            self._abandoned.add(req)
        handle_id = self._handle_for(req)
        spawned = self._spawns.pop(handle_id, None) is not None
        delivery = self._deliveries.get(reply.id) if isinstance(reply, Handle) else None
        if isinstance(reply, Handle) and delivery is not None and delivery.result is not None:
            self._confirm(reply.id, delivery)  # its result came with it, unseen
        elif spawned or isinstance(reply, Handle):
            self._unwanted.add(handle_id)

    def _file_reply(self, req: int, reply: Message | Handle) -> None:
        if req in self._abandoned:
            self._abandoned.discard(req)
        else:
            self._replies[req] = reply

    def _learn(self, info: dict[str, Any]) -> None:
        server = info.get("server")
        if self._server is not None and server != self._server:
            # Nothing asked of the old server may be asked of this one; the
            # connection itself goes on, with the new server.
            self._spawns.clear()
            self._followed.clear()
            self._server = server
            raise ServerUnavailable(
                f"the server at {self.endpoint} restarted: requests in flight were lost"
            )
        self._server = server
        self._max_message = info.get("max_message_bytes", self._max_message)
        self._max_workers = info.get("max_workers", self._max_workers)
        self._requests.max_batch = max(1, int(info.get("max_batch", 1)))

    def _forgotten(self, handle_id: str, why: str) -> None:
        """The server no longer knows a job we wait on: end the wait with it.
        For a spawn not yet answered, the request itself never arrived (say,
        a TCP connection broke): it is sent again, under the same name."""
        spawn = self._spawns.get(handle_id)
        if spawn is not None:
            req, make = spawn
            self._requests.put([encode(make(req))])
            return
        delivery = self._deliveries.get(handle_id)
        if delivery is not None:
            delivery.lost(handle_id, why)

    def _server_max_workers(self) -> int:
        if self._max_workers is None:
            self._wait(lambda: self._max_workers is not None, self.timeout)
        assert self._max_workers is not None
        return self._max_workers
