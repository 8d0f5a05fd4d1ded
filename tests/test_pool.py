"""The ready pool: refill, retirement on a new generation, replacement of a
pool child that fails validation; and reload."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time

import psutil

from zygote.server.children import Child
from zygote.server.lifecycle import ChildState, Slots
from zygote.server.loop import EventLoop
from zygote.server.pool import ReadyPool

from .conftest import Server, wait_until, zygote_cli


def _pool_full(server: Server) -> bool:
    stats = server.stats()
    return stats["pool_ready"] == stats["pool_size"] and stats["pool_starting"] == 0


def _idle_children(server: Server) -> set[int]:
    zygote = server.stats()["zygote_pid"]
    return {p.pid for p in server.descendants() if p.pid != zygote}


def test_spawn_takes_a_child_forked_before_the_request_and_the_pool_refills(start_server) -> None:
    server = start_server("--prefork", "2")
    wait_until(lambda: _pool_full(server), what="a full pool")
    stats = server.stats()
    assert stats["workers"] == 0  # pool children are not workers
    pooled = _idle_children(server)
    assert len(pooled) == 2
    client = server.client(timeout=30)
    handle = client.spawn("tests.tasks:whoami")
    assert handle.pid in pooled  # no fork on the request's path
    assert handle.result()["pid"] == handle.pid
    wait_until(
        lambda: _pool_full(server) and handle.pid not in _idle_children(server),
        what="the pool to refill",
    )
    refilled = _idle_children(server)
    assert len(refilled) == 2 and refilled != pooled
    assert server.stats()["pool_taken"] == 1


def test_pool_children_run_one_task_each(start_server) -> None:
    server = start_server("--prefork", "2")
    wait_until(lambda: _pool_full(server), what="a full pool")
    client = server.client(timeout=30)
    pids = [client.spawn("tests.tasks:whoami").result()["pid"] for _ in range(6)]
    assert len(set(pids)) == 6  # never reused: no task state carried over


def test_pool_child_failing_validation_is_replaced(start_server, tmp_path) -> None:
    server = start_server(
        "--prefork",
        "2",
        preload=("tests.tasks", "tests.flaky_validator"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_FLAKY": "raise"},
    )
    wait_until(lambda: _pool_full(server), what="the pool to fill despite a bad child")
    stats = server.stats()
    assert stats["failed_starts"] == 1 and stats["validator_failures"] == {"flaky": 1}
    bad = int((tmp_path / "flaky-validator-ran").read_text())
    assert bad not in _idle_children(server)
    client = server.client(timeout=30)
    assert client.spawn("tests.tasks:add", 2, 3).result() == 5


def test_reload_retires_the_old_generation_and_its_pool(start_server) -> None:
    server = start_server("--prefork", "2")
    wait_until(lambda: _pool_full(server), what="a full pool")
    old_zygote = server.stats()["zygote_pid"]
    old_pool = _idle_children(server)
    client = server.client(timeout=30)
    assert client.reload() == 2
    wait_until(
        lambda: server.stats()["generation"] == 2 and _pool_full(server),
        what="generation 2 with a full pool",
    )
    wait_until(
        lambda: (
            not any(
                psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                for pid in old_pool | {old_zygote}
            )
        ),
        what="the old zygote and its pool gone",
    )
    handle = client.spawn("tests.tasks:add", 1, 1)
    assert handle.generation == 2 and handle.result() == 2
    assert "generation 2 takes over from 1" in server.log()


def test_zygote_death_retires_its_pool(start_server) -> None:
    server = start_server("--prefork", "2")
    wait_until(lambda: _pool_full(server), what="a full pool")
    old_pool = _idle_children(server)
    os.kill(server.stats()["zygote_pid"], signal.SIGKILL)
    wait_until(
        lambda: server.stats()["generation"] == 2 and _pool_full(server),
        what="generation 2 with a full pool",
    )
    wait_until(lambda: not (old_pool & _idle_children(server)), what="the old pool retired")
    client = server.client(timeout=30)
    assert client.spawn("tests.tasks:add", 1, 1).generation == 2


def test_reload_that_cannot_preload_keeps_the_old_generation(start_server, tmp_path) -> None:
    module = tmp_path / "changing.py"
    module.write_text("VALUE = 1\n")
    server = start_server(preload=("tests.tasks", "changing"), env={"PYTHONPATH": str(tmp_path)})
    module.write_text("raise RuntimeError('broken deploy')\n")
    proc = zygote_cli("reload", "--endpoint", server.endpoint)
    assert proc.returncode == 1
    assert "failed to start" in proc.stderr and "keeps serving" in proc.stderr
    assert server.stats()["generation"] == 1
    with server.client(timeout=30) as client:
        assert client.spawn("tests.tasks:add", 1, 1).result() == 2
    module.write_text("VALUE = 2\n")
    proc = zygote_cli("reload", "--endpoint", server.endpoint)
    assert proc.returncode == 0, proc.stderr
    assert "generation 3 serving" in proc.stdout
    with server.client(timeout=30) as client:
        assert client.spawn("changing:VALUE.__int__").result() == 2


def test_stop_with_a_pool_fork_in_flight_exits_promptly(start_server) -> None:
    # A pool fork requested before the stop, answered after it: its child
    # must be let go, or the server would wait for it forever.
    server = start_server("--prefork", "2", "--kill-grace", "30")
    wait_until(lambda: _pool_full(server), what="a full pool")
    zygote = server.stats()["zygote_pid"]
    os.kill(zygote, signal.SIGSTOP)
    try:
        client = server.client(timeout=30)
        assert client.spawn("tests.tasks:add", 1, 1).result() == 2  # takes a pool child
        wait_until(lambda: server.stats()["pool_starting"] == 1, what="a refill in flight")
        client.stop()
    finally:
        os.kill(zygote, signal.SIGCONT)
    assert server.wait_exit(10) == 0


def test_a_pool_child_that_died_is_not_handed_a_task() -> None:
    # Its death and a spawn can arrive in the same batch of events, the spawn
    # handled first: the pool asks the child's pidfd, not the (stale) flag.
    process = subprocess.Popen(["sleep", "60"])
    # A supervisor with many clients and workers has descriptors past 1023,
    # where select() cannot go: the check must work there too.
    pidfd = os.dup2(first := os.pidfd_open(process.pid), 1500)
    os.close(first)
    a, b = socket.socketpair()
    current = object()
    child = Child("pool:1", current, Slots(1))  # type: ignore[arg-type]
    child.forked(process.pid, pidfd, a, 1 << 20)
    child.move(ChildState.IDLE)
    retired: list[Child] = []
    forks: list[str] = []
    loop = EventLoop()
    pool = ReadyPool(1, loop, lambda name: forks.append(name), retired.append)  # type: ignore[func-returns-value]
    try:
        assert child.running()
        process.kill()
        death = select.poll()
        death.register(pidfd, select.POLLIN)
        assert death.poll(10_000), "the child did not die"
        assert child.alive and not child.running()  # not reaped, not handled yet
        pool.ready.append(child)
        assert pool.take(current) is None  # type: ignore[arg-type]
        assert retired == [child]
        deadline = time.monotonic() + 5
        while not forks and time.monotonic() < deadline:
            loop.run_once(0.1)  # until the refill timer is due
        assert len(forks) == 1, "the dead child was not replaced"
    finally:
        process.kill()
        process.wait()
        os.close(pidfd)
        a.close()
        b.close()
