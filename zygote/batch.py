"""`Zygote.map()` and `zygote map`: many calls of one task through one
client, a window of them in flight, results in order."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import signal
import time
from collections.abc import Iterable, Iterator
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


def run_batch(
    client: Zygote,
    task: str,
    calls: Iterable[Call],
    max_in_flight: int | None,
    timeout: float | None,
    profile: str | None,
    *,
    return_errors: bool,
) -> Iterator[Any]:
    """`task(*args, **kwargs)` for every call, results in order. At most
    `max_in_flight` (default: the server's max-workers) are spawned ahead of
    the one being consumed. A failed call raises its ZygoteError when its
    turn comes, or with `return_errors` yields it. Ctrl-C while waiting
    cancels the batch's queued and running jobs (`cancel`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    window = max_in_flight or client._server_max_workers()
    items = iter(calls)
    pending: collections.deque[int] = collections.deque()

    def fill() -> None:
        for args, kwargs in itertools.islice(items, window - len(pending)):
            message = client._spawn_message(task, args, kwargs, profile=profile)
            pending.append(client._send_spawn(message))

    def outcome(req: int) -> Any:
        handle = client._reply(req, _remaining(deadline), client._handle_for(req))
        assert isinstance(handle, Handle)
        return handle.result(_remaining(deadline))

    def results() -> Iterator[Any]:
        waiting: list[int] = []
        try:
            while pending:
                waiting = [pending.popleft()]
                try:
                    value = outcome(waiting[0])
                except (ZygoteTimeout, ServerUnavailable):
                    raise  # the batch's own deadline, or no server: not a call's
                except ZygoteError as exc:
                    if not return_errors:
                        raise
                    value = exc
                waiting = []
                fill()
                yield value
        except KeyboardInterrupt:
            cancel(client, [*waiting, *pending])
            raise
        finally:
            for req in pending:  # replies already here, or still to come
                client._abandon(req)

    fill()
    return results()


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


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
