"""Corrupt children are detected, replaced, and escalated (fork-safety #1-#4)."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

import pytest

from zygote import SpawnError, Zygote

from .conftest import wait_until


def test_openssl_threads_in_the_zygote_lose_no_job(start_server) -> None:
    """Two threads hammer OpenSSL in the zygote; children that inherit a held
    lock hang in the openssl validator, are killed and replaced."""
    server = start_server(
        "--max-workers",
        "4",
        "--validate-timeout",
        "1",
        "--kill-signal",
        "SIGKILL",
        preload=("tests.tasks", "examples.openssl_threads"),
    )
    client = server.client(timeout=120)
    values = list(client.map("tests.tasks:identity", range(300), max_in_flight=8))
    assert values == list(range(300))
    stats = server.stats()
    assert stats["accepted"] == 300
    assert {t["name"] for t in stats["threads"]} >= {"tls-contexts", "pbkdf2"}
    # Whatever hung was replaced, never shown to a client; say how many.
    print(
        f"hung or failed starts replaced: {stats['failed_starts']}, "
        f"by step: {stats['validator_failures']}"
    )


def test_validator_that_raises_once_is_replaced(start_server, tmp_path) -> None:
    server = start_server(
        preload=("tests.tasks", "tests.flaky_validator"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_FLAKY": "raise"},
    )
    client = server.client(timeout=30)
    handle = client.spawn("tests.flaky_validator:after_fork_ran")
    assert handle.result() == str(handle.pid)  # the after-fork hook ran in it
    first = int((tmp_path / "flaky-validator-ran").read_text())
    assert first != handle.pid
    # The bad child may have been a pool child whose exit is processed after
    # our result arrived: the counters settle within moments.
    wait_until(lambda: server.stats()["failed_starts"] == 1, what="the failed start counted")
    assert server.stats()["validator_failures"] == {"flaky": 1}
    log = server.log()
    assert "failed flaky" in log and "RuntimeError: first child is bad" in log


def test_validator_that_hangs_once_is_killed_at_the_deadline(start_server, tmp_path) -> None:
    server = start_server(
        "--validate-timeout",
        "0.5",
        "--kill-signal",
        "SIGABRT",
        "--prefork",
        "0",  # the spawn's own child is the one that hangs
        preload=("tests.tasks", "tests.flaky_validator"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_FLAKY": "hang"},
    )
    client = server.client(timeout=30)
    started = time.monotonic()
    assert client.spawn("tests.tasks:add", 20, 22).result() == 42
    assert time.monotonic() - started >= 0.5
    assert server.stats()["validator_failures"] == {"flaky": 1}
    log = server.log()
    assert "not ready within 0.5s (stuck in flaky)" in log
    # SIGABRT + faulthandler: the child's stack shows where it hung.
    wait_until(
        lambda: "flaky_validator.py" in server.log() and "in flaky" in server.log(),
        what="the hung child's stack in the log",
    )


def test_lock_held_forever_escalates_to_a_graceful_stop(start_server) -> None:
    server = start_server(
        "--max-workers",
        "2",
        "--validate-timeout",
        "0.5",
        "--corrupt-limit",
        "2",
        "--zygote-failure-limit",
        "2",
        "--shutdown-grace",
        "5",
        preload=("tests.tasks", "tests.lockheld"),
    )
    errors: list[BaseException] = []

    def client_waits() -> None:
        with Zygote(server.endpoint, timeout=60) as client:
            try:
                client.spawn("tests.tasks:add", 1, 2)
            except BaseException as exc:
                errors.append(exc)

    started = time.monotonic()
    clients = [threading.Thread(target=client_waits) for _ in range(3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    code = server.wait_exit(60)
    elapsed = time.monotonic() - started
    assert code == 4
    assert len(errors) == 3 and all(isinstance(e, SpawnError) for e in errors), errors
    assert all("server shutting down" in str(e) for e in errors), errors
    # Documented bound: limit x corrupt-limit x validate-timeout, plus boots.
    assert elapsed < 20
    last = server.log().strip().splitlines()[-1]
    assert "stopped (exit status 4)" in last and "zygotes in a row failed" in last


def test_fork_that_fails_is_retried(start_server) -> None:
    server = start_server(
        preload=("tests.tasks", "tests.fork_faults"), env={"ZYGOTE_TEST_FORK_FAULT": "fail-once"}
    )
    client = server.client(timeout=30)
    assert client.spawn("tests.tasks:add", 1, 2).result() == 3
    assert server.stats()["failed_starts"] == 1
    assert "fork() failed" in server.log()


def test_zygote_exiting_during_a_spawn_loses_nothing(start_server) -> None:
    server = start_server(
        "--prefork",
        "0",  # forks happen only for spawns, so the second fork is the second spawn's
        preload=("tests.tasks", "tests.fork_faults"),
        env={"ZYGOTE_TEST_FORK_FAULT": "exit-second"},
    )
    client = server.client(timeout=30)
    assert client.spawn("tests.tasks:add", 1, 2).result() == 3  # first fork: fine
    handle = client.spawn("tests.tasks:add", 3, 4)  # its zygote dies on this one
    assert handle.result() == 7
    assert handle.generation == 2
    assert "exited with code 17" in server.log()


def test_child_of_a_zygote_that_died_before_reporting_it_is_killed(start_server, tmp_path) -> None:
    # The zygote dies between fork() and Forked; its child hangs in a
    # validator. Nobody armed its lifeline or its deadline: the supervisor,
    # now its parent, must find and kill it.
    server = start_server(
        "--validate-timeout",
        "0.5",
        preload=("tests.tasks", "tests.fork_faults", "tests.flaky_validator"),
        env={
            "ZYGOTE_TEST_FORK_FAULT": "die-after",
            "ZYGOTE_TEST_FLAKY": "hang",
            "ZYGOTE_TEST_DIR": str(tmp_path),
        },
        wait=False,
    )
    wait_until((tmp_path / "flaky-validator-ran").exists, what="the orphan's validator")
    orphan = int((tmp_path / "flaky-validator-ran").read_text())
    wait_until(lambda: not os.path.exists(f"/proc/{orphan}"), what="the orphan killed and reaped")
    assert "never handed over" in server.log()
    with server.client(timeout=30) as client:
        handle = client.spawn("tests.tasks:add", 1, 2)
        assert handle.result() == 3 and handle.generation == 2


def test_zygote_that_stops_answering_is_replaced(start_server) -> None:
    server = start_server("--fork-timeout", "1", "--prefork", "0")  # the spawn must fork
    client = server.client(timeout=30)
    stuck = server.zygote_pid()
    os.kill(stuck, signal.SIGSTOP)
    started = time.monotonic()
    handle = client.spawn("tests.tasks:add", 5, 6)
    assert handle.result() == 11
    assert time.monotonic() - started >= 1.0
    assert handle.generation == 2
    assert "did not answer a fork request within 1s" in server.log()
    wait_until(lambda: not os.path.exists(f"/proc/{stuck}"), what="the stopped zygote reaped")


def test_builtin_probes_run_only_with_threads_and_can_be_disabled(start_server) -> None:
    preload = ("tests.tasks", "tests.sabotage")
    # The three servers start at once.
    corrupt = start_server(
        "--spawn-retries",
        "1",
        "--corrupt-limit",
        "10",
        "--prefork",
        "0",  # only the spawn's own two attempts fork, so they can be counted
        preload=preload,
        wait=False,
    )
    disabled = start_server("--disable-validator", "logging", preload=preload, wait=False)
    alone = start_server(preload=preload, env={"ZYGOTE_TEST_NO_THREAD": "1"}, wait=False)
    for server in (corrupt, disabled, alone):
        server.wait_ready()
    # A logging handler's lock left held: the logging probe fails every child
    # forked while the zygote has a thread ...
    with corrupt.client(timeout=30) as client, pytest.raises(SpawnError) as info:
        client.spawn("tests.tasks:add", 1, 1)
    assert "logging failed: RuntimeError: the lock of <Handler" in str(info.value)
    assert corrupt.stats()["validator_failures"] == {"logging": 2}
    # ... is not run at all when disabled by name ...
    with disabled.client(timeout=30) as client:
        assert client.spawn("tests.tasks:add", 1, 1).result() == 2
    # ... nor when the zygote has no other thread: nothing can be left locked
    # by a fork then (this held lock was taken by the main thread itself).
    with alone.client(timeout=30) as client:
        assert client.spawn("tests.tasks:add", 1, 1).result() == 2
    assert alone.stats()["threads"] == []


def test_builtin_probes_pass_in_a_healthy_threaded_zygote(start_server) -> None:
    server = start_server(preload=("tests.tasks", "tests.threaded", "ssl"))
    with server.client(timeout=30) as client:
        assert list(client.map("tests.tasks:identity", range(5))) == list(range(5))
    assert server.stats()["failed_starts"] == 0


def test_a_fork_reply_that_lost_its_descriptors_never_runs_the_task_twice(
    start_server, tmp_path
) -> None:
    # At its descriptor limit the supervisor gets a fork reply whose
    # descriptors the kernel dropped. The zygote has already told that child
    # to go, so it may be running the task: it is killed and the request ends
    # in an error rather than being run a second time by the next zygote.
    server = start_server("--prefork", "0")
    runs = tmp_path / "runs"
    client = server.client(timeout=30)
    assert client.spawn("tests.tasks:add", 1, 2).result() == 3  # connected, zygote up
    wait_until(lambda: client.stats()["workers"] == 0, what="the first worker to end")
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{server.pid}/fd"))
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (in_use + 1, hard))  # room for one
    try:
        with pytest.raises(SpawnError, match="not run again"):
            client.spawn("tests.tasks:append_pid", str(runs))
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert client.spawn("tests.tasks:add", 3, 4).result() == 7  # a fresh zygote serves
    assert len(runs.read_text().split() if runs.exists() else []) <= 1
    assert "out of file descriptors" in server.log()
