"""How a task's end reaches the client: values, errors, deaths, timeouts (core #2)."""

from __future__ import annotations

import signal

import pytest

from zygote import TaskError, TaskTimeout, WorkerLost, Zygote, ZygoteTimeout

from .conftest import wait_until


def test_value_round_trip(shared_client: Zygote) -> None:
    handle = shared_client.spawn("tests.tasks:echo", 1, "two", [3], {"four": 4}, b"\x05", key=None)
    assert handle.result() == {
        "args": [1, "two", [3], {"four": 4}, b"\x05"],
        "kwargs": {"key": None},
    }
    assert handle.pid > 0 and handle.generation == 1
    assert handle.done()


def test_raise_gives_task_error_with_remote_traceback(shared_client: Zygote) -> None:
    handle = shared_client.spawn("tests.tasks:raise_value_error", "no good")
    with pytest.raises(TaskError) as info:
        handle.result()
    assert info.value.exc_type == "ValueError"
    assert "no good" in str(info.value)
    assert "raise ValueError(text)" in info.value.remote_traceback
    assert "tests/tasks.py" in info.value.remote_traceback


@pytest.mark.parametrize(
    ("task", "sig"),
    [("tests.tasks:abort", signal.SIGABRT), ("tests.tasks:segfault", signal.SIGSEGV)],
)
def test_abort_and_segfault_give_worker_lost_with_signal(
    shared_client: Zygote, task: str, sig: int
) -> None:
    handle = shared_client.spawn(task)
    with pytest.raises(WorkerLost) as info:
        handle.result()
    assert info.value.signal == sig
    assert info.value.exit_code is None
    assert sig.name in str(info.value)
    assert handle.wait().signal == sig


def test_sys_exit_gives_task_error_with_exit_code(shared_client: Zygote) -> None:
    handle = shared_client.spawn("tests.tasks:exit_with", 3)
    with pytest.raises(TaskError) as info:
        handle.result()
    assert info.value.exc_type == "SystemExit"
    assert info.value.exit_code == 3
    exit_info = handle.wait()
    assert exit_info.exit_code == 3 and exit_info.signal is None
    assert exit_info.description == "exited with code 3"


def test_sys_exit_zero_is_a_none_result(shared_client: Zygote) -> None:
    assert shared_client.spawn("tests.tasks:exit_with", 0).result() is None


def test_os_exit_without_result_gives_worker_lost_with_code(shared_client: Zygote) -> None:
    with pytest.raises(WorkerLost) as info:
        shared_client.spawn("tests.tasks:hard_exit", 7).result()
    assert info.value.exit_code == 7 and info.value.signal is None
    assert not isinstance(info.value, TaskTimeout)


def test_task_timeout_kills_and_reports(shared_client: Zygote) -> None:
    handle = shared_client.spawn("tests.tasks:sleep", 30, _timeout=0.3)
    with pytest.raises(TaskTimeout) as info:
        handle.result(timeout=20)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, WorkerLost)
    assert info.value.signal == signal.SIGTERM
    assert "timeout" in str(info.value)


def test_task_ignoring_sigterm_is_killed_after_grace(start_server) -> None:
    server = start_server("--kill-grace", "0.3")
    client = server.client(timeout=30)
    handle = client.spawn("tests.tasks:ignore_sigterm_and_sleep", 30, _timeout=0.3)
    with pytest.raises(TaskTimeout) as info:
        handle.result(timeout=20)
    assert info.value.signal == signal.SIGKILL


def test_result_wait_timeout_leaves_task_running(shared_client: Zygote) -> None:
    handle = shared_client.spawn("tests.tasks:sleep", 1.0, "late")
    with pytest.raises(ZygoteTimeout):
        handle.result(timeout=0.05)
    assert handle.result(timeout=20) == "late"


def test_env_and_cwd_options(shared_client: Zygote, tmp_path) -> None:
    assert (
        shared_client.spawn(
            "tests.tasks:env", "ZYGOTE_TEST_VAR", _env={"ZYGOTE_TEST_VAR": "v"}
        ).result()
        == "v"
    )
    assert shared_client.spawn("tests.tasks:cwd", _cwd=str(tmp_path)).result() == str(tmp_path)
    # The zygote's environment is untouched by one worker's overrides.
    assert shared_client.spawn("tests.tasks:env", "ZYGOTE_TEST_VAR").result() is None


def test_bad_cwd_is_a_task_error(shared_client: Zygote) -> None:
    with pytest.raises(TaskError) as info:
        shared_client.spawn("tests.tasks:cwd", _cwd="/no/such/dir").result()
    assert info.value.exc_type == "FileNotFoundError"


def test_nested_qualname(shared_client: Zygote) -> None:
    assert shared_client.spawn("tests.tasks:Nested.method", 21).result() == 42


def test_kill_running_worker(shared_client: Zygote) -> None:
    handle = shared_client.spawn("tests.tasks:sleep", 30)
    assert handle.kill(signal.SIGKILL)
    with pytest.raises(WorkerLost) as info:
        handle.result(timeout=20)
    assert info.value.signal == signal.SIGKILL
    assert not handle.kill()  # nothing left to signal


def test_wait_reports_usage(shared_client: Zygote) -> None:
    handle = shared_client.spawn("tests.tasks:add", 1, 2)
    assert handle.result() == 3
    info = handle.wait(timeout=20)
    assert info.pid == handle.pid
    assert info.exit_code == 0 and info.description == "exited normally"
    assert info.duration > 0 and info.maxrss_kb > 0


def test_a_worker_holds_no_descriptor_of_the_zygote_or_its_siblings(
    shared_client: Zygote, tmp_path
) -> None:
    # Siblings alive while the worker is forked: the zygote holds a pidfd for
    # each, and a worker must inherit none of them (nor the zygote's control
    # socket): stdio, its channel and its lifeline are all it needs.
    go = tmp_path / "go"
    siblings = [shared_client.spawn("tests.tasks:wait_for_file", str(go)) for _ in range(2)]
    fds = {
        int(fd): target
        for fd, target in shared_client.spawn("tests.tasks:open_fds").result().items()
    }
    go.write_text("go")
    assert [s.result() for s in siblings] == [s.pid for s in siblings]
    extra = {fd: target for fd, target in fds.items() if fd > 2}
    assert not [t for t in extra.values() if "pidfd" in t], extra
    assert len(extra) <= 2, extra


def test_the_exit_report_comes_even_if_the_result_was_dropped_meanwhile(
    start_server, tmp_path
) -> None:
    # One result kept at most: the second job's result drops the first's
    # while the first worker is still in its exit hooks (2 s: the client
    # probes the silence after 1 s, and its attach must still find the job).
    # Its client still hears how its process ended.
    server = start_server(
        "--max-results",
        "1",
        "--exit-timeout",
        "2",
        preload=("tests.exit_hooks",),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_EXIT_HANG": "sleep"},
    )
    client = server.client(timeout=30)
    first = client.spawn("tests.exit_hooks:work", "a")
    second = client.spawn("tests.exit_hooks:work", "b")
    wait_until(lambda: "dropped the uncollected result" in server.log(), what="a drop")
    exit_info = first.wait()
    assert exit_info.exit_code == 0 and exit_info.description == "exited normally"
    assert second.result() == "b"
