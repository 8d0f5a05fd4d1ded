"""Real servers for the tests: each test starts its own `zygote start` process."""

from __future__ import annotations

import contextlib
import os
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
from zygote.errors import ZygoteError

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
        return self.log_path.read_text(errors="replace")

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


@pytest.fixture
def start_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []
    # ipc paths are limited to ~107 bytes: keep the directory short.
    sockdir = tempfile.mkdtemp(prefix="zyt-", dir="/tmp")

    def start(
        *args: str,
        preload: tuple[str, ...] = ("tests.tasks",),
        env: dict[str, str] | None = None,
        wait: bool = True,
        endpoint: str | None = None,
    ) -> Server:
        endpoint = endpoint or f"ipc://{sockdir}/s{len(servers)}.sock"
        log_path = Path(sockdir) / f"server{len(servers)}.log"
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
        servers.append(server)
        if wait:

            def answers() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"server exited early:\n{server.log()}")
                try:
                    with Zygote(endpoint, timeout=2) as client:
                        return client.stats()["zygote_state"] == "ready"
                except ZygoteError:
                    return False

            wait_until(answers, timeout=30, what="the server to answer")
        return server

    yield start

    for server in servers:
        for client in server.clients:
            client.close()
        leftovers = server.descendants()
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGQUIT)  # fast stop
            try:
                server.process.wait(15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(5)
        for proc in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else True
        if failed:
            print(f"--- server log {server.log_path} ---\n{server.log()}")
        # The server carries on after a bug in its own code, but tests must not.
        assert "internal error" not in server.log(), server.log()
    shutil.rmtree(sockdir, ignore_errors=True)


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
def raw(server: Server):
    """A bare DEALER socket, to send what the real client never would."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(server.endpoint)
    yield sock
    sock.close()
