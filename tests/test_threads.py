"""Thread inventory, allowlist, refuse mode, prevent_fork and fork_lock (fork-safety #5, #6)."""

from __future__ import annotations

import time

import pytest

from zygote import SpawnError

from .conftest import wait_until


def test_numpy_and_a_python_thread_show_up_in_stats_and_warnings(start_server) -> None:
    # OpenBLAS stops its pool at the first fork: make that fork the spawn's.
    server = start_server("--prefork", "0", preload=("tests.tasks", "numpy", "tests.threaded"))
    client = server.client(timeout=30)
    first = client.spawn("tests.tasks:add", 1, 2)
    assert first.result() == 3
    text = "\n".join(first.warnings)
    # OpenBLAS's pool: a native thread, named after the import that started it.
    assert "native thread" in text and "started while importing numpy" in text
    # A Python thread: what it runs, and the line that started it.
    assert "Python thread 'metrics-flusher' (tests.threaded:_flush_metrics)" in text
    assert "started by tests.threaded (" in text and "tests/threaded.py:" in text
    # The thread vouched for with zygote.mark_fork_safe() is not a warning.
    assert "vouched-heartbeat" not in text
    threads = {t["name"]: t for t in server.stats()["threads"]}
    assert (
        threads["metrics-flusher"]["kind"] == "python" and not threads["metrics-flusher"]["allowed"]
    )
    assert threads["vouched-heartbeat"]["allowed"]
    # One warning per thread when the set appears, not one per fork.
    second = client.spawn("tests.tasks:add", 2, 2)
    assert second.result() == 4
    assert any("metrics-flusher" in w for w in second.warnings)
    log = server.log()
    assert log.count("Python thread 'metrics-flusher'") == 1
    # OpenBLAS stopped its pool at the first fork: still listed, not running.
    blas = [t for t in server.stats()["threads"] if t["origin"] == "numpy"]
    assert blas and blas[0]["kind"] == "native"


def test_allowlist_silences_threads(start_server) -> None:
    server = start_server(
        "--allow-thread",
        "metrics-*",
        "--allow-thread",
        "numpy",
        preload=("tests.tasks", "numpy", "tests.threaded"),
    )
    client = server.client(timeout=30)
    handle = client.spawn("tests.tasks:add", 1, 2)
    assert handle.result() == 3
    assert handle.warnings == []
    assert all(t["allowed"] for t in server.stats()["threads"])
    assert "WARNING" not in server.log()


def test_refuse_policy_turns_threads_into_spawn_errors(start_server) -> None:
    preload = ("tests.tasks", "tests.threaded")
    # Both start at once.
    server = start_server("--thread-policy", "refuse", preload=preload, wait=False)
    allowed = start_server(
        "--thread-policy",
        "refuse",
        "--allow-thread",
        "metrics-flusher",
        preload=preload,
        wait=False,
    )
    server.wait_ready()
    allowed.wait_ready()
    client = server.client(timeout=30)
    with pytest.raises(SpawnError, match=r"refused to fork.*metrics-flusher"):
        client.spawn("tests.tasks:add", 1, 2)
    with allowed.client(timeout=30) as other:
        assert other.spawn("tests.tasks:add", 1, 2).result() == 3


def test_no_threads_means_no_warnings(shared_client) -> None:
    handle = shared_client.spawn("tests.tasks:add", 1, 2)
    assert handle.result() == 3 and handle.warnings == []


def test_fork_waits_for_an_open_prevent_fork_section(start_server, tmp_path) -> None:
    server = start_server(
        "--fork-guard-timeout",
        "3",
        "--prefork",
        "0",  # the spawn must fork, not take a child forked earlier
        preload=("tests.tasks", "tests.gate"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_HOLD": "0.5"},
    )
    client = server.client(timeout=30)
    (tmp_path / "open-section").write_text("")
    wait_until((tmp_path / "section-opened").exists, what="the section to open")
    started = client.spawn("tests.gate:started_at").result()
    closed = float((tmp_path / "section-closed").read_text())
    assert started > closed  # the child began only after the section ended
    stats = server.stats()
    assert stats["fork_guard_waits"] == 1 and stats["fork_guard_timeouts"] == 0
    assert stats["fork_guard_wait_seconds"] > 0


def test_a_long_section_no_fork_gave_up_on_is_still_waited_for(start_server, tmp_path) -> None:
    """A section open for longer than the guard timeout is waited for like
    any other; only one a fork already gave up on is not."""
    server = start_server(
        "--fork-guard-timeout",
        "1",
        "--prefork",
        "0",
        preload=("tests.tasks", "tests.gate"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_HOLD": "1.6"},
    )
    client = server.client(timeout=30)
    (tmp_path / "open-section").write_text("")
    wait_until((tmp_path / "section-opened").exists, what="the section to open")
    opened = float((tmp_path / "section-opened").read_text())
    time.sleep(max(0.0, opened + 1.1 - time.monotonic()))  # the section is 1.1 s old
    started = client.spawn("tests.gate:started_at").result()
    assert started > float((tmp_path / "section-closed").read_text())
    assert server.stats()["fork_guard_timeouts"] == 0


def test_a_fork_goes_ahead_past_the_guard_timeout_and_names_the_holder(
    start_server, tmp_path
) -> None:
    server = start_server(
        "--fork-guard-timeout",
        "1",
        "--prefork",
        "0",
        preload=("tests.tasks", "tests.gate"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_HOLD": "30"},
    )
    client = server.client(timeout=30)
    (tmp_path / "open-section").write_text("")
    wait_until((tmp_path / "section-opened").exists, what="the section to open")
    for _ in range(3):
        assert client.spawn("tests.tasks:add", 1, 2).result() == 3
    assert not (tmp_path / "section-closed").exists()  # it did not wait for the section
    stats = server.stats()
    assert stats["fork_guard_timeouts"] == 3
    # The first fork waited its second; the section was stuck by then, and
    # the others did not wait for it again.
    assert 1.0 <= stats["fork_guard_wait_seconds"] < 2.0
    log = server.log()
    assert "a fork went ahead without the OpenSSL/resolver/prevent_fork() gate" in log
    assert log.count("a fork went ahead without") == 1  # once per change, not per fork
    assert "'section-holder' in prevent_fork() in tests.gate:_section_holder" in log


def test_fork_waits_for_a_fork_lock(start_server, tmp_path) -> None:
    server = start_server(
        "--fork-guard-timeout",
        "3",
        "--prefork",
        "0",  # the spawn must fork, not take a child forked earlier
        preload=("tests.tasks", "tests.gate"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_HOLD": "0.5"},
    )
    client = server.client(timeout=30)
    (tmp_path / "hold-lock").write_text("")
    wait_until((tmp_path / "lock-taken").exists, what="the lock to be taken")
    started = client.spawn("tests.gate:started_at").result()
    released = float((tmp_path / "lock-released").read_text())
    assert started > released
    assert server.stats()["fork_guard_waits"] == 1
    # The child got the lock released: it can take it.
    assert client.spawn("tests.gate:take_lock").result() is True
