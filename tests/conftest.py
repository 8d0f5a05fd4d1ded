"""Real servers for the tests: a test starts its own `zygote start` process
(`start_server`, `server`), or borrows a clean shared one (`shared_server`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

import examples.tls_server
from zygote import Zygote
from zygote.codec import encode
from zygote.errors import ZygoteError
from zygote.protocol import Collected, Ping

from .collector import Collector

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


def at_rest(client: Zygote) -> dict[str, Any]:
    """The server's stats once no worker runs, no result is kept and the
    ready pool is full: when its descriptors can be counted (each pool
    child or worker holds four of the supervisor's; a refill is quick, but
    a count taken during one is off by four)."""

    def rest() -> dict[str, Any] | None:
        stats = client.stats()
        idle = stats["workers"] == 0 and stats["results_kept"] == 0
        return stats if idle and stats["pool_ready"] == stats["pool_size"] else None

    return dict(wait_until(rest, 30, "no worker, no result kept, a full pool"))


def is_server(cmdline: list[str]) -> bool:
    """A `zygote start` process: by its title (zygote: supervisor ...), or
    by its command line where setproctitle is not installed."""
    return (bool(cmdline) and cmdline[0].startswith("zygote: supervisor ")) or (
        "zygote" in cmdline and "start" in cmdline
    )


def zygote_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "zygote", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    endpoint: str
    log_path: Path
    clients: list[Zygote] = field(default_factory=list)
    #: Where this test's part of the log begins (a shared server's log
    #: holds the tests before it too: see `shared_server`).
    log_offset: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs: Any) -> Zygote:
        client = Zygote(self.endpoint, **kwargs)
        self.clients.append(client)
        return client

    def stats(self) -> dict[str, Any]:
        with Zygote(self.endpoint, timeout=10) as client:
            return client.stats()

    def log(self) -> str:
        if not self.log_offset:
            return self.log_path.read_text(errors="replace")
        with open(self.log_path, "rb") as log:
            log.seek(self.log_offset)
            text = log.read().decode(errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")  # as read_text does

    def zygote_pid(self) -> int:
        return int(wait_until(lambda: self.stats()["zygote_pid"], what="a zygote"))

    def descendants(self) -> list[psutil.Process]:
        """Live (non-zombie) processes under the supervisor, but its cgroup
        watchdog (zygote/watchdog.py)."""
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() != psutil.STATUS_ZOMBIE and proc.name() != "zygote-watchdog":
                    alive.append(proc)
        return alive

    def workers(self) -> list[psutil.Process]:
        zygotes = {self.stats()["zygote_pid"]}
        return [p for p in self.descendants() if p.pid not in zygotes]

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until its zygote is ready (what `start_server` waits for, unless
        told `wait=False`: then several servers can start at once)."""

        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            try:
                with Zygote(self.endpoint, timeout=2) as client:
                    return client.stats()["zygote_state"] == "ready"
            except ZygoteError:
                return False

        wait_until(answers, timeout=timeout, what="the server to answer")


def launch_server(
    sockdir: str,
    number: int,
    *args: str,
    preload: tuple[str, ...] = ("tests.tasks",),
    env: dict[str, str] | None = None,
    wait: bool = True,
    endpoint: str | None = None,
) -> Server:
    """Start `zygote start` with its socket and log in `sockdir`, and (with
    `wait`) wait until its zygote is ready."""
    endpoint = endpoint or f"ipc://{sockdir}/s{number}.sock"
    log_path = Path(sockdir) / f"server{number}.log"
    command = [sys.executable, "-m", "zygote", "start", "--endpoint", endpoint]
    for module in preload:
        command += ["--preload", module]
    command += list(args)
    # Python's defaults, whatever the shell running the tests has set:
    # buffered streams are what the children's stream repair is for.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**base, "PYTHONFAULTHANDLER": "1", **(env or {})},
        )
    server = Server(process, endpoint, log_path)
    if wait:
        server.wait_ready()
    return server


def stop_servers(*servers: Server) -> None:
    """Close their clients, stop them fast (SIGQUIT, all at once), and kill
    what they left."""
    leftovers = []
    for server in servers:
        for client in server.clients:
            client.close()
        leftovers += server.descendants()
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGQUIT)  # fast stop
    for server in servers:
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _failed(request: pytest.FixtureRequest) -> bool:
    return request.node.rep_call.failed if hasattr(request.node, "rep_call") else True


@pytest.fixture
def start_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    """Start a server of the test's own: `start(*args, preload=, env=, wait=,
    endpoint=)`. It is stopped when the test ends."""
    servers: list[Server] = []
    # ipc paths are limited to ~107 bytes: keep the directory short.
    sockdir = tempfile.mkdtemp(prefix="zyt-", dir="/tmp")

    def start(*args: str, **kwargs: Any) -> Server:
        servers.append(launch_server(sockdir, len(servers), *args, **kwargs))
        return servers[-1]

    yield start

    stop_servers(*servers)
    for server in servers:
        if _failed(request):
            print(f"--- server log {server.log_path} ---\n{server.log()}")
        # The server carries on after a bug in its own code, but tests must not.
        assert "internal error" not in server.log(), server.log()
    shutil.rmtree(sockdir, ignore_errors=True)


# -- servers shared by the tests that leave them as they found them --------------


#: What every test gets from a shared server: no job running, queued or
#: kept, its first zygote ready, nothing wrong so far.
CLEAN = {
    "state": "running",
    "zygote_state": "ready",
    "generation": 1,
    "zygote_restarts": 0,
    "incoming_generation": None,
    "workers": 0,
    "queued": 0,
    "results_kept": 0,
    "internal_errors": 0,
}


def _unclean(server: Server) -> dict[str, Any] | None:
    """What differs from CLEAN (None: nothing), or why it cannot be asked."""
    if server.process.poll() is not None:
        return {"exited": server.process.returncode}
    try:
        stats = server.stats()
    except ZygoteError as exc:
        return {"stats": str(exc)}
    differs = {key: stats.get(key) for key, value in CLEAN.items() if stats.get(key) != value}
    return differs or None


def _collect(server: Server) -> None:
    """Confirm every result kept of the jobs in `server`'s log (its part: a
    test's view), as their client would have: a raw client that left
    without doing so leaves them kept."""
    handles = sorted(set(re.findall(r"worker \d+ \[([^\]\s]+)\] ", server.log())))
    if not handles:
        return
    sock = raw_socket(server.endpoint)
    try:
        sock.send(encode(Collected(handles)))
        sock.send(encode(Ping(1)))  # answered once the confirmation is in
        sock.recv()
    finally:
        sock.close()


def _settled(server: Server) -> bool:
    """Nothing running or queued any more (or nothing left to ask)."""
    if server.process.poll() is not None:
        return True
    try:
        stats = server.stats()
    except ZygoteError:
        return True
    return not (stats["workers"] or stats["queued"])


class SharedServers:
    """One server per configuration for the whole session, handed to one
    test at a time (`shared_start_server`), and only ever clean: before each
    test the last one's jobs must have ended within SETTLE seconds, the
    results its raw clients left unconfirmed are confirmed (`_collect`),
    and then the server must be CLEAN, else it is replaced by a new one.
    A test that kills, stops, reconfigures or counts the server's
    processes takes its own (`start_server`); one that checks a counter
    (accepted, completed) reads it first and checks the difference."""

    #: How long a test's leftovers (a job it killed, a worker exiting) may take.
    SETTLE = 5.0

    def __init__(self) -> None:
        self.sockdir = tempfile.mkdtemp(prefix="zys-", dir="/tmp")
        self.servers: dict[tuple[Any, ...], Server] = {}
        self.views: dict[tuple[Any, ...], Server] = {}  # the last handed out
        self.started = 0
        self.replaced: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def get(
        self,
        *args: str,
        preload: tuple[str, ...] = ("tests.tasks",),
        env: dict[str, str] | None = None,
    ) -> Server:
        key = (args, tuple(preload), tuple(sorted((env or {}).items())))
        server = self.servers.get(key)
        if server is not None:
            with contextlib.suppress(AssertionError):  # what is left is judged below
                wait_until(lambda: _settled(server), timeout=self.SETTLE)
            unclean = _unclean(server)
            if unclean is not None and set(unclean) == {"results_kept"}:
                with contextlib.suppress(zmq.ZMQError):
                    _collect(self.views[key])
                unclean = _unclean(server)
            if unclean is not None:
                self.replaced.append((key, unclean))
                stop_servers(server)
                server = None
        if server is None:
            self.started += 1
            server = launch_server(self.sockdir, self.started, *args, preload=preload, env=env)
            self.servers[key] = server
            # Ready is not yet clean: the pool's first children are starting.
            wait_until(lambda: _unclean(server) is None, what="the new server to be clean")
        # This test's view: its own clients, its own part of the log.
        view = Server(
            server.process, server.endpoint, server.log_path, [], server.log_path.stat().st_size
        )
        self.views[key] = view
        return view

    def close(self) -> None:
        stop_servers(*self.servers.values())
        shutil.rmtree(self.sockdir, ignore_errors=True)


_SHARED: list[SharedServers] = []


@pytest.fixture(scope="session")
def shared_servers() -> Iterator[SharedServers]:
    servers = SharedServers()
    _SHARED.append(servers)
    yield servers
    servers.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How often a test left a shared server unclean (each one cost a start)."""
    for servers in _SHARED:
        terminalreporter.write_line(
            f"shared servers: {servers.started} started, {len(servers.replaced)} replaced"
        )
        for key, unclean in servers.replaced:
            terminalreporter.write_line(f"  replaced {key[0]}: {unclean}")


@pytest.fixture
def shared_start_server(
    request: pytest.FixtureRequest, shared_servers: SharedServers
) -> Iterator[Callable[..., Server]]:
    """`start_server`'s shared counterpart: `start(*args, preload=, env=)`
    gives a clean server of that configuration, started once per session
    (see SharedServers for what a test may and may not do with it)."""
    views: list[Server] = []

    def start(*args: str, **kwargs: Any) -> Server:
        views.append(shared_servers.get(*args, **kwargs))
        return views[-1]

    yield start

    for view in views:
        for client in view.clients:
            client.close()
        if _failed(request):
            print(f"--- shared server log {view.log_path} (this test's part) ---\n{view.log()}")
        assert "internal error" not in view.log(), view.log()


@pytest.fixture
def shared_server(shared_start_server: Callable[..., Server]) -> Server:
    """The `server` fixture's configuration, shared (see SharedServers)."""
    return shared_start_server("--max-workers", "4")


@pytest.fixture
def shared_client(shared_server: Server) -> Zygote:
    return shared_server.client(timeout=30)


def raw_socket(endpoint: str) -> zmq.Socket[bytes]:
    """A bare DEALER socket, to send what the real client never would."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    return sock


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture(scope="session")
def tls_server() -> Iterator[str]:
    """A local TLS echo server (examples.tls_server), as HOST:PORT:CAFILE."""
    with examples.tls_server.running(REPO) as address:
        yield address


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A local OTLP/Sentry collector in this process (tests/collector.py)."""
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    """A server with the test tasks preloaded and default settings."""
    return start_server("--max-workers", "4")


@pytest.fixture
def client(server: Server) -> Zygote:
    return server.client(timeout=30)


@pytest.fixture
def raw(server: Server) -> Iterator[zmq.Socket[bytes]]:
    """A bare DEALER socket, to send what the real client never would."""
    sock = raw_socket(server.endpoint)
    yield sock
    sock.close()


@pytest.fixture
def shared_raw(shared_server: Server) -> Iterator[zmq.Socket[bytes]]:
    """`raw`, on the shared server."""
    sock = raw_socket(shared_server.endpoint)
    yield sock
    sock.close()
