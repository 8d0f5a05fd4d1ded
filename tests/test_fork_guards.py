"""The fork guards prevent corrupt children (fork-safety round 2): threads
busy with logging, TLS and stdout in the zygote, and not one child hangs."""

from __future__ import annotations

import time

import pytest

from .conftest import wait_until

VALIDATORS_OFF = [
    arg
    for name in ("openssl", "logging", "stdio", "resolver")
    for arg in ("--disable-validator", name)
]


@pytest.mark.parametrize("threads", ["logging", "tls"])
def test_service_threads_give_no_corrupt_child(start_server, tls_server, tmp_path, threads) -> None:
    """examples.service_threads: threads logging at a high rate to a rotating
    file and making TLS requests, tasks that log and make a request. Without
    the guards about half of such children hang (docs/fork-safety.md); the
    validators are off, so a hang could only end as a task timeout."""
    server = start_server(
        "--max-workers",
        "4",
        "--validate-timeout",
        "2",
        *VALIDATORS_OFF,
        preload=("examples.service_threads",),
        env={
            "SERVICE_TLS": tls_server,
            "SERVICE_LOG": str(tmp_path / "service.log"),
            "SERVICE_LOG_THREADS": "2" if threads == "logging" else "0",
        },
    )
    client = server.client(timeout=120)
    jobs = client.map("examples.service_threads:handle_job", range(100), timeout=45)
    assert list(jobs) == list(range(100))
    stats = server.stats()
    assert stats["failed_starts"] == 0
    assert stats["fork_guard_timeouts"] == 0
    # The guards were needed: threads were inside them at fork time.
    assert stats["fork_guard_waits"] > 0


def test_a_thread_printing_to_a_buffered_stdout_does_not_hang_children(
    start_server, tmp_path
) -> None:
    """The stdout buffer lock is taken outside every guard; the child gets a
    fresh stdout on the same descriptor instead."""
    server = start_server(
        "--validate-timeout",
        "2",
        *VALIDATORS_OFF,
        preload=("tests.busy_threads",),
        env={"ZYGOTE_TEST_BUSY": "print", "ZYGOTE_TEST_DIR": str(tmp_path)},
    )
    client = server.client(timeout=60)
    assert list(client.map("tests.busy_threads:print_and_log", range(60), timeout=45)) == list(
        range(60)
    )
    assert server.stats()["failed_starts"] == 0
    assert "task 59\n" in (tmp_path / "stdout.txt").read_text()


def test_fork_lock_on_a_logging_handler_lock_works(start_server, tmp_path) -> None:
    """logging re-creates its handler locks in the child; a fork_lock on one
    must not then be released twice ("cannot release un-acquired lock")."""
    server = start_server(
        preload=("tests.busy_threads",),
        env={"ZYGOTE_TEST_BUSY": "fork_lock", "ZYGOTE_TEST_DIR": str(tmp_path)},
    )
    client = server.client(timeout=60)
    assert list(client.map("tests.busy_threads:print_and_log", range(30))) == list(range(30))
    assert server.stats()["failed_starts"] == 0
    assert "task 29" in (tmp_path / "locked.log").read_text()


def test_a_thread_blocked_in_a_tls_read_does_not_stall_forks(
    start_server, tls_server, tmp_path
) -> None:
    """Reads on an established TLS connection are not gated: a long poll or
    a stream on a slow peer must not hold forks off."""
    server = start_server(
        "--fork-guard-timeout",
        "4",
        "--prefork",
        "0",
        preload=("tests.tasks", "tests.busy_threads"),
        env={
            "ZYGOTE_TEST_BUSY": "tls_read",
            "ZYGOTE_TEST_DIR": str(tmp_path),
            "ZYGOTE_TEST_TLS": tls_server,
        },
    )
    wait_until((tmp_path / "tls-reading").exists, what="the thread to block in recv()")
    client = server.client(timeout=60)
    assert list(client.map("tests.tasks:identity", range(20))) == list(range(20))
    stats = server.stats()
    assert stats["fork_guard_waits"] == 0 and stats["fork_guard_timeouts"] == 0


def test_short_lived_threads_get_one_warning_and_never_kill_the_zygote(start_server) -> None:
    """A thread starting short-lived threads all the time: inventories race
    with threads ending (ProcessLookupError killed the zygote once), and each
    new thread used to get a warning line of its own."""
    server = start_server(
        "--prefork",
        "0",
        preload=("tests.tasks", "tests.busy_threads"),
        env={"ZYGOTE_TEST_BUSY": "churn"},
    )
    zygote_pid = server.zygote_pid()
    client = server.client(timeout=60)
    assert list(client.map("tests.tasks:identity", range(300))) == list(range(300))
    assert server.stats()["zygote_pid"] == zygote_pid
    log = server.log()
    assert log.count("Python thread 'churner'") == 1
    # Every short thread is the same kind: one line, however many ran; and
    # one seen starting or ending is not taken for a native thread.
    assert log.count("Python thread 'Thread-") <= 1
    assert "native thread" not in log
    assert "died" not in log


def test_refuse_with_a_pool_backs_off_and_logs_once(start_server) -> None:
    server = start_server("--thread-policy", "refuse", preload=("tests.tasks", "tests.threaded"))
    # The pool keeps asking, less and less often (0.1 s, doubling): three
    # rounds of refusals show that the log does not grow with them.
    wait_until(lambda: server.stats()["refused_forks"] >= 6, timeout=10, what="refusals")
    log = server.log()
    assert log.count("ready pool: refused to fork") == 1
    assert log.count("'metrics-flusher' (tests.threaded:_flush_metrics), started by") == 2
    assert "at fork time" not in log  # no fork happened


def test_before_exit_hooks_run_after_the_task(start_server, tmp_path) -> None:
    server = start_server(preload=("tests.exit_hooks",), env={"ZYGOTE_TEST_DIR": str(tmp_path)})
    client = server.client(timeout=30)
    handle = client.spawn("tests.exit_hooks:work", "job-1")
    assert handle.result() == "job-1"
    assert handle.wait().exit_code == 0
    assert (tmp_path / f"flushed-{handle.pid}").read_text() == "job-1"
    assert (tmp_path / f"after-{handle.pid}").read_text() == "ran"


@pytest.mark.parametrize("hang", ["sleep", "blocked"])
def test_a_hanging_before_exit_hook_is_cut_off(start_server, tmp_path, hang) -> None:
    server = start_server(
        "--exit-timeout",
        "0.5",
        "--kill-grace",
        "0.5",
        preload=("tests.exit_hooks",),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_EXIT_HANG": hang},
    )
    client = server.client(timeout=30)
    started = time.monotonic()
    handle = client.spawn("tests.exit_hooks:work", "job-2")
    assert handle.result() == "job-2"  # the result does not wait for the hooks
    exit_info = handle.wait()
    assert time.monotonic() - started < 10
    assert (tmp_path / f"flushed-{handle.pid}").read_text() == "job-2"
    if hang == "sleep":  # interrupted at the deadline; the rest skipped
        assert exit_info.exit_code == 0
        assert "before_exit hook tests.exit_hooks:hang cut off" in server.log()
    else:  # where SIGALRM cannot reach, the supervisor's SIGKILL does
        assert exit_info.signal == 9
    assert not (tmp_path / f"after-{handle.pid}").exists()
