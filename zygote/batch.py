"""`Zygote.map()` and `zygote map`: many calls of one task through one
client, a window of them in flight, results in order."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import signal
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import ServerUnavailable, ZygoteError, ZygoteTimeout
from .handle import Handle
from .protocol import Kill, Ping

if TYPE_CHECKING:
    from .client import Zygote

#: One call: positional and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]

#: How long a cancelled batch waits for the server to confirm the kills.
_CANCEL_TIMEOUT = 5.0


class Batch(Iterator[Any]):
    """`task(*args, **kwargs)` for every call, results in order (iterate it).
    At most `max_in_flight` (default: the server's max-workers) are spawned
    ahead of the one being consumed. A failed call raises its ZygoteError
    when its turn comes, or with `return_errors` yields it. Ctrl-C while it
    waits cancels the batch's queued and running jobs; `cancel()` does that
    from outside (the caller interrupted between results, say). With
    `on_output`, each job's output pieces go there before its result."""

    def __init__(
        self,
        client: Zygote,
        task: str,
        calls: Iterable[Call],
        max_in_flight: int | None,
        timeout: float | None,
        profile: str | None,
        *,
        return_errors: bool,
        on_output: Callable[[str, bytes], object] | None = None,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        window = max_in_flight or client._server_max_workers()
        self._flight = _Flight(
            client, task, profile, iter(calls), window, deadline, return_errors, on_output
        )
        # The generator holds the flight, never this object: a batch dropped
        # unfinished is closed at once, by reference counting, and the
        # results of its jobs not consumed are confirmed unseen as they come
        # (with a cycle, they would wait on the server for the collector).
        self._results = self._flight.run()
        self._flight.fill()
        # A batch never iterated has no generator frame to clean up after it.
        # Not at exit: a dead server would make that wait (the process is
        # leaving anyway, and the server lets unconfirmed results expire).
        weakref.finalize(self, _release_quietly, self._flight).atexit = False

    def __next__(self) -> Any:
        return next(self._results)

    def close(self) -> None:
        """Leave early, as from a generator: the jobs not consumed run on,
        and their results are confirmed unseen when they come."""
        self._results.close()
        self._flight.release()  # a generator never started has no `finally` to run

    def cancel(self) -> None:
        """Stop the jobs not yet consumed: queued ones never start, running
        ones get SIGTERM. Once."""
        self._flight.cancel()


class _Flight:
    """A batch's jobs in flight, and its results in order (`run`)."""

    def __init__(
        self,
        client: Zygote,
        task: str,
        profile: str | None,
        items: Iterator[Call],
        window: int,
        deadline: float | None,
        return_errors: bool,
        on_output: Callable[[str, bytes], object] | None,
    ) -> None:
        self.client, self.task, self.profile = client, task, profile
        self.items, self.window, self.deadline = items, window, deadline
        self.return_errors, self.on_output = return_errors, on_output
        self.pending: collections.deque[int] = collections.deque()
        self.waiting: list[int] = []

    def cancel(self) -> None:
        reqs, self.waiting = [*self.waiting, *self.pending], []
        self.pending.clear()
        if reqs:
            cancel(self.client, reqs)
        for req in reqs:  # their results, when they come, are nobody's
            self.client._abandon(req)

    def fill(self) -> None:
        """Spawn up to the window, all in one ZeroMQ message (with the
        confirmations of the results consumed since the last fill)."""
        client = self.client
        calls = itertools.islice(self.items, self.window - len(self.pending))
        makes = [
            client._spawn_message(self.task, args, kwargs, profile=self.profile)
            for args, kwargs in calls
        ]
        if makes:
            self.pending.extend(client._send_spawns(makes))
        elif not client._socket.closed:
            client._requests.send_confirmations()  # no spawn left to ride with

    def outcome(self, req: int) -> Any:
        client = self.client
        handle = client._reply(req, _remaining(self.deadline), client._handle_for(req))
        assert isinstance(handle, Handle)
        if self.on_output is not None:
            for stream, data in handle.output(_remaining(self.deadline)):
                self.on_output(stream, data)
        # Its confirmation rides with the spawn `fill` sends next. Held
        # only here, never across a `yield`: a map left unfinished must not
        # hold back the client's other confirmations.
        requests = client._requests
        requests.maps += 1
        try:
            return handle.result(_remaining(self.deadline))
        finally:
            requests.maps -= 1

    def run(self) -> Generator[Any, None, None]:
        try:
            while self.pending:
                self.waiting = [self.pending.popleft()]
                try:
                    value = self.outcome(self.waiting[0])
                except (ZygoteTimeout, ServerUnavailable):
                    raise  # the batch's own deadline, or no server: not a call's
                except ZygoteError as exc:
                    if not self.return_errors:
                        raise
                    value = exc
                self.waiting = []
                self.fill()
                yield value
        except KeyboardInterrupt:
            self.cancel()
            raise
        finally:
            self.release()

    def release(self) -> None:
        """Nobody takes the results not consumed: they are confirmed unseen
        as they come (replies already here, or still to come)."""
        pending, self.pending = list(self.pending), collections.deque()
        for req in pending:
            self.client._abandon(req)
        if not self.client._socket.closed:
            self.client._requests.send_confirmations()  # any still held


def submit(
    client: Zygote, task: str, args: tuple[Any, ...], kwargs: dict[str, Any], **options: Any
) -> str:
    """Send a spawn and return its job id once the server has read it,
    without waiting for a worker; raises the server's refusal (busy, not
    allowed, malformed) if it sent one. `options`: `_spawn_message`'s."""
    req = client._send_spawn(client._spawn_message(task, args, kwargs, **options))
    # Replies come in order: once the ping's is here, a refusal would be too.
    client._call(lambda r: Ping(r), client.timeout or 10.0)
    handle_id = client._handle_for(req)
    if req in client._replies:
        client._reply(req, 0)  # raises a refusal; a Spawned is as good as accepted
    else:
        # Its Spawned, when it comes, is nobody's business; and unlike an
        # abandoned spawn, its result is left on the server for `attach`.
        client._abandoned.add(req)
        client._spawns.pop(handle_id, None)
    return handle_id


def cancel(client: Zygote, reqs: list[int]) -> None:
    """Stop the jobs of these spawn requests: queued ones never start,
    running ones get SIGTERM. One round trip makes sure the server has read
    it all before the caller, interrupted, closes the connection."""
    for handle_id in [client._handle_for(req) for req in reqs]:
        client._abandoned.add(client._send(functools.partial(_kill, handle_id)))
    with contextlib.suppress(ZygoteError):
        client._call(lambda req: Ping(req), _CANCEL_TIMEOUT)


def _kill(handle_id: str, req: int) -> Kill:
    return Kill(req, handle_id, signal.SIGTERM)


def _release_quietly(flight: _Flight) -> None:
    # From a finalizer: an error could only be printed, and nobody waits.
    with contextlib.suppress(ZygoteError):
        flight.release()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
