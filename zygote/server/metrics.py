"""Prometheus metrics (`zygote start --metrics HOST:PORT`), served by the
supervisor's own loop.

The supervisor is single-threaded; prometheus_client's own HTTP server runs
a thread, which would read the spawner's state while the loop changes it.
So the loop does the serving too: a non-blocking listening socket watched by
the EventLoop, and a minimal HTTP/1.0 responder that answers each scrape with
`generate_latest()` of a private registry, whose one collector reads plain
counters and the spawner's stats at scrape time, in the loop. Job outcomes
are counted by `JobOutcomes`, which stands between the spawner and the
supervisor (outcomes.Clients) and needs no prometheus_client: without
`--metrics` nothing imports it.

What is exposed is counts and durations only: no job ids, tasks, arguments,
results or pids. docs/operations.md lists the metrics.
"""

from __future__ import annotations

import bisect
import collections
import logging
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import zmq

from ..codec import result_outcome
from ..config import ConfigError, host_port
from ..protocol import LOST, ErrorCode
from .loop import EventLoop
from .outcomes import Clients

if TYPE_CHECKING:
    from .spawner import Spawner

log = logging.getLogger("zygote.supervisor")

#: The outcomes `zygote_spawns_total` counts, one per accepted spawn request:
#: the task returned (ok), raised, called sys.exit (exited); its worker ended
#: without a result (lost), was killed at its `_timeout` (timeout), or by a
#: client (killed: a running or not yet started job); no healthy worker could
#: be made for it, or the thread policy refused the fork (failed_start); it
#: was queued or starting when the server stopped (shutdown).
OUTCOMES = ("ok", "raised", "exited", "lost", "timeout", "killed", "failed_start", "shutdown")
#: `zygote_spawn_duration_seconds`: from accepted to outcome, 2 ms to an hour.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_MAX_CONNECTIONS = 16  # scrapes at once; more are closed at once
_REQUEST_MAX = 8192
_SCRAPE_TIMEOUT = 5.0  # seconds a scraper has to send its request and read the answer


class JobOutcomes:
    """Counts every accepted job's outcome and times it, on its way from the
    spawner to the supervisor (it forwards every report unchanged)."""

    def __init__(self, clients: Clients, clock: Callable[[], float]) -> None:
        self.clients = clients
        self.clock = clock
        self.spawns: collections.Counter[str] = collections.Counter(dict.fromkeys(OUTCOMES, 0))
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket, the last one +Inf
        self.duration_sum = 0.0
        self._accepted: dict[str, float] = {}  # jobs without an outcome yet
        self._killed: set[str] = set()

    def accepted(self, handle: str) -> None:
        self._accepted[handle] = self.clock()

    def killed(self, handle: str) -> None:
        """A client killed the job: if no result comes, that is its outcome."""
        if handle in self._accepted:
            self._killed.add(handle)

    def _outcome(self, handle: str, outcome: str) -> None:
        accepted = self._accepted.pop(handle, None)
        self._killed.discard(handle)
        if accepted is None:  # counted already (a result, then the exit)
            return
        self.spawns[outcome] += 1
        duration = self.clock() - accepted
        self.buckets[bisect.bisect_left(BUCKETS, duration)] += 1
        self.duration_sum += duration

    # -- outcomes.Clients ---------------------------------------------------

    def job_started(self, handle: str, pid: int, generation: int, warnings: list[str]) -> None:
        self.clients.job_started(handle, pid, generation, warnings)

    def job_result(self, handle: str, data: bytes) -> None:
        self._outcome(handle, result_outcome(data) or LOST)
        self.clients.job_result(handle, data)

    def job_ended(self, handle: str, result: bytes | None, exited: bytes) -> None:
        if handle in self._accepted:  # no result came: the one made for it says why
            outcome = (result_outcome(result) if result else None) or LOST
            if outcome == LOST and handle in self._killed:
                outcome = "killed"
            self._outcome(handle, outcome)
        self.clients.job_ended(handle, result, exited)

    def job_failed(self, handle: str, code: ErrorCode, text: str, reasons: list[str]) -> None:
        if handle in self._killed:
            outcome = "killed"
        else:
            outcome = "shutdown" if code is ErrorCode.SHUTTING_DOWN else "failed_start"
        self._outcome(handle, outcome)
        self.clients.job_failed(handle, code, text, reasons)


class Collector:
    """The metrics, read at scrape time (in the loop) from the job outcomes
    and the spawner's stats: the same numbers `zygote status` shows."""

    def __init__(self, jobs: JobOutcomes, spawner: Spawner) -> None:
        self.jobs, self.spawner = jobs, spawner

    def describe(self) -> list[Any]:
        return []  # names are not checked against other collectors: the registry is ours

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        jobs, stats = self.jobs, self.spawner.stats()
        spawns = CounterMetricFamily(
            "zygote_spawns", "Accepted spawn requests by outcome.", labels=["outcome"]
        )
        for outcome, count in jobs.spawns.items():
            spawns.add_metric([outcome], count)
        yield spawns
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], jobs.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "zygote_spawn_duration_seconds",
            "Seconds from an accepted spawn request to its outcome.",
            buckets=buckets,
            sum_value=jobs.duration_sum,
        )
        yield GaugeMetricFamily("zygote_workers", "Workers with a job.", stats["workers"])
        yield GaugeMetricFamily("zygote_queue_depth", "Jobs waiting for a slot.", stats["queued"])
        failures = CounterMetricFamily(
            "zygote_validator_failures",
            "Children that failed a validator or start-up step, by its name.",
            labels=["validator"],
        )
        for step, count in stats["validator_failures"].items():
            failures.add_metric([step], count)
        yield failures
        yield from self._lineages()

    def _lineages(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["profile"]
        ready = GaugeMetricFamily("zygote_pool_ready", "Ready pool children.", labels=labels)
        restarts = CounterMetricFamily(
            "zygote_zygote_restarts", "Zygotes started again after one was lost.", labels=labels
        )
        generation = GaugeMetricFamily(
            "zygote_generation", "The serving zygote's generation.", labels=labels
        )
        for name, lineage in self.spawner.lineages.items():
            stats = lineage.stats()
            ready.add_metric([name], stats["pool_ready"])
            restarts.add_metric([name], stats["zygote_restarts"])
            if stats["generation"] is not None:
                generation.add_metric([name], stats["generation"])
        yield from (ready, restarts, generation)


def serve(address: str | None, loop: EventLoop, jobs: JobOutcomes, spawner: Spawner) -> str | None:
    """Listen for scrapes on `address` (HOST:PORT), if given; the URL to scrape."""
    if address is None:
        return None
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise ConfigError(
            "--metrics needs prometheus_client: pip install 'zygote[metrics]'"
        ) from None
    registry = CollectorRegistry()
    registry.register(Collector(jobs, spawner))
    return MetricsServer(address, loop, registry).url


class MetricsServer:
    """A minimal HTTP/1.0 server in the event loop: GET /metrics, nothing else."""

    def __init__(self, address: str, loop: EventLoop, registry: Any) -> None:
        host, port = host_port(address)
        self.loop, self.registry = loop, registry
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            self.sock = socket.socket(info[0], socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(info[4])
            self.sock.listen(_MAX_CONNECTIONS)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        self.sock.setblocking(False)
        bound = self.sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}/metrics"
        self.connections: dict[int, _Scrape] = {}
        loop.watch(self.sock.fileno(), self._accept)
        log.info("metrics at %s", self.url)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the next scrape will do
                log.warning("metrics: could not accept a scrape: %s", exc)
                return
            if len(self.connections) >= _MAX_CONNECTIONS:
                conn.close()
                continue
            self.connections[conn.fileno()] = _Scrape(self, conn)

    def page(self, request: bytes) -> bytes:
        """The whole response to one request."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        method, _, rest = request.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(b"405 Method Not Allowed", b"text/plain", b"GET /metrics only\n")
        if path not in (b"/metrics", b"/"):
            return _response(b"404 Not Found", b"text/plain", b"try /metrics\n")
        body = generate_latest(self.registry)
        head = _response(b"200 OK", CONTENT_TYPE_LATEST.encode(), body)
        return head[: len(head) - len(body)] if method == b"HEAD" else head


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    return head % (status, content_type, len(body)) + body


class _Scrape:
    """One connection: read the request head, write the response, close."""

    def __init__(self, server: MetricsServer, conn: socket.socket) -> None:
        self.server, self.conn = server, conn
        self.fd = conn.fileno()
        conn.setblocking(False)
        self.received = b""
        self.outgoing = memoryview(b"")
        # A scraper that never finishes its request must not hold a slot.
        self.timer = server.loop.later(_SCRAPE_TIMEOUT, self.close)
        server.loop.watch(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self.conn.recv(_REQUEST_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.received += data
        if b"\r\n\r\n" in self.received or b"\n\n" in self.received:
            self._respond(self.server.page(self.received))
        elif len(self.received) > _REQUEST_MAX:
            self._respond(_response(b"431 Request Header Fields Too Large", b"text/plain", b""))

    def _respond(self, response: bytes) -> None:
        self.outgoing = memoryview(response)
        self.server.loop.unwatch(self.fd)
        self.server.loop.watch(self.fd, self._on_writable, zmq.POLLOUT)
        self._on_writable()

    def _on_writable(self) -> None:
        try:
            sent = self.conn.send(self.outgoing)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self.outgoing)  # the scraper left: nothing more to send
        self.outgoing = self.outgoing[sent:]
        if not self.outgoing:
            self.close()

    def close(self) -> None:
        if self.server.connections.pop(self.fd, None) is None:
            return
        self.timer.cancel()
        self.server.loop.unwatch(self.fd)
        self.conn.close()
