"""Threads out of the zygote: background functions in the helper process,
and thread starts deferred to each worker (fork-safety round 2, part 2)."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request

import pytest

from zygote import Zygote, background

from .collector import Collector
from .conftest import wait_until


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _heartbeat(directory) -> dict:
    try:
        return json.loads((directory / "heartbeat").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_background_functions_run_in_the_helper_and_get_every_message(
    start_server, tmp_path
) -> None:
    server = start_server(
        "--max-workers",
        "4",
        preload=("tests.background_app",),
        env={"ZYGOTE_TEST_DIR": str(tmp_path)},
    )
    # Each background thread names itself in /proc as it starts.
    stats = wait_until(
        lambda: (s := server.stats())["helper_threads"] == ["collector", "heartbeat"] and s,
        what="the helper and its two threads",
    )
    zygote_pid, helper_pid = stats["zygote_pid"], stats["helper_pid"]
    wait_until(lambda: _heartbeat(tmp_path).get("pid") == helper_pid, what="a heartbeat")
    assert _tasks(zygote_pid) == 1
    client = server.client(timeout=60)
    handles = [client.spawn("tests.background_app:report", worker, 10) for worker in range(100)]
    pids = {handle.result() for handle in handles}
    assert len(pids) == 100 and _tasks(zygote_pid) == 1
    lines = wait_until(
        lambda: (
            (lines := (tmp_path / "collected").read_text().splitlines())
            and len(lines) >= 1000
            and lines
        ),
        what="1,000 messages",
    )
    items = [json.loads(line) for line in lines]
    assert len(items) == 1000
    for worker in range(100):  # each sender's messages, in the order sent
        assert [i["n"] for i in items if i["worker"] == worker] == list(range(10))
    assert server.stats()["background_dropped"] == 0


def test_a_killed_helper_is_replaced_and_the_server_stop_takes_it_along(
    start_server, tmp_path
) -> None:
    server = start_server(preload=("tests.background_app",), env={"ZYGOTE_TEST_DIR": str(tmp_path)})
    first = wait_until(lambda: server.stats()["helper_pid"], what="the helper")
    os.kill(first, signal.SIGKILL)
    second = wait_until(
        lambda: (pid := server.stats()["helper_pid"]) not in (None, first) and pid,
        timeout=2,
        what="a new helper within 2 s",
    )
    wait_until(lambda: _heartbeat(tmp_path).get("pid") == second, timeout=2, what="its heartbeat")
    assert server.stats()["helper_restarts"] == 1
    assert f"helper (pid {first}) killed by SIGKILL" in server.log()
    with Zygote(server.endpoint, timeout=10) as client:
        client.stop()
    assert server.wait_exit(30) == 0
    assert not os.path.exists(f"/proc/{second}")  # gone, not even a zombie


def test_messages_a_helper_cannot_take_are_dropped_counted_and_logged_once(
    start_server, tmp_path
) -> None:
    """A background function that never reads its inbox: the helper's inbox
    fills (10,000), then the channel, then each worker's buffer. The tasks
    never block; what cannot be kept is counted."""
    server = start_server(
        preload=("tests.background_app",),
        env={"ZYGOTE_TEST_DIR": str(tmp_path), "ZYGOTE_TEST_STUCK_COLLECTOR": "1"},
    )
    client = server.client(timeout=60)
    accepted = sum(client.map("tests.background_app:report_stuck", [6000] * 4))
    # 10,000 wait in the inbox; every other message is dropped somewhere, and
    # counted: by send() itself (it said False), or later (it said True).
    wait_until(
        lambda: server.stats()["background_dropped"] == 14_000,
        timeout=15,
        what=f"14,000 drops counted ({24_000 - accepted} by send())",
    )
    assert server.log().count("background messages dropped") == 1


def test_send_outside_a_zygote_and_bad_messages_are_clear_errors() -> None:
    @background
    def inbox_taker(inbox) -> None:
        pass

    with pytest.raises(RuntimeError, match="not a zygote's worker"):
        inbox_taker.send({"a": 1})
    with pytest.raises(TypeError):
        inbox_taker.send(object())

    @background
    def no_inbox() -> None:
        pass

    with pytest.raises(TypeError, match="takes no inbox"):
        no_inbox.send(1)


def test_deferred_threads_run_in_every_worker_not_in_the_zygote(start_server) -> None:
    server = start_server(
        "--thread-policy", "defer", "--max-workers", "4", preload=("tests.deferred_app",)
    )
    zygote_pid = server.zygote_pid()
    assert _tasks(zygote_pid) == 1
    client = server.client(timeout=60)
    handles = [client.spawn("tests.deferred_app:ticker_runs_here") for _ in range(20)]
    results = [handle.result() for handle in handles]
    assert results == [{"ticking": True, "tickers": 1}] * 20
    assert _tasks(zygote_pid) == 1
    assert server.stats()["threads"] == []  # nothing to warn about
    assert "deferred to each worker: the start of threads 'ticker'" in server.log()


def test_opentelemetry_under_defer(start_server, collector: Collector) -> None:
    """The batch processor's thread is deferred out of the zygote; in each
    worker its at-fork hook starts a new one, and the deferred one is not
    started a second time. Spans still arrive (the before_exit flush)."""
    server = start_server(
        "--thread-policy",
        "defer",
        preload=("examples.opentelemetry_tasks", "tests.deferred_app"),
        env=collector.env(),
    )
    assert _tasks(server.zygote_pid()) == 1
    client = server.client(timeout=60)
    assert client.spawn("tests.deferred_app:otel_processor_threads").result() == 1
    assert list(client.map("examples.opentelemetry_tasks:traced", range(40))) == list(range(40))
    wait_until(lambda: len(collector.spans) >= 40, timeout=15, what="40 spans")
    assert collector.spans == ["task"] * 40


def test_sentry_under_defer(start_server, collector: Collector) -> None:
    """sentry-sdk starts its transport thread on first use: one in each
    worker, none in the zygote; every task's event arrives once."""
    server = start_server(
        "--thread-policy",
        "defer",
        preload=("examples.sentry_tasks", "tests.deferred_app"),
        env=collector.env(),
    )
    assert _tasks(server.zygote_pid()) == 1
    client = server.client(timeout=60)
    assert client.spawn("tests.deferred_app:sentry_transport_threads").result() == 1
    assert list(client.map("examples.sentry_tasks:report", range(40))) == list(range(40))
    wait_until(lambda: len(collector.events) >= 41, timeout=15, what="41 events")
    assert sorted(collector.events) == sorted(["counting", *(f"task {i}" for i in range(40))])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_prometheus_counter_of_50_tasks_reads_50_at_the_helpers_endpoint(
    start_server, tmp_path
) -> None:
    port = _free_port()
    server = start_server(
        preload=("examples.prometheus_metrics",),
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
            "METRICS_PORT": str(port),
            "METRICS_ARCHIVE_EVERY": "0.2",
        },
    )
    client = server.client(timeout=60)
    assert list(client.map("examples.prometheus_metrics:handle", range(50))) == list(range(50))

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    # Dead workers' files are folded into one archive; the total stays. (The
    # zygote has a file too: prometheus_client makes it when the counter is
    # defined; the helper, a fork of it, shares that one until it counts.)
    stats = server.stats()
    alive = {f"counter_{stats['zygote_pid']}.db", f"counter_{stats['helper_pid']}.db"}

    def folded() -> bool:
        files = {f for f in os.listdir(tmp_path) if f.startswith("counter_")}
        return "counter_archive.db" in files and files - {"counter_archive.db"} <= alive

    wait_until(folded, timeout=15, what="dead workers' files folded")
    assert "tasks_handled_total 50.0" in scrape()
    assert _tasks(server.zygote_pid()) == 1  # the HTTP server runs in the helper


def test_a_new_generation_brings_its_own_helper(start_server, tmp_path) -> None:
    server = start_server(preload=("tests.background_app",), env={"ZYGOTE_TEST_DIR": str(tmp_path)})
    first = wait_until(lambda: server.stats()["helper_pid"], what="the helper")
    with Zygote(server.endpoint, timeout=30) as client:
        assert client.reload() == 2
    second = wait_until(
        lambda: (s := server.stats())["generation"] == 2 and s["helper_pid"],
        what="generation 2's helper",
    )
    assert second != first
    wait_until(lambda: not os.path.exists(f"/proc/{first}"), what="the old helper gone")
    wait_until(lambda: _heartbeat(tmp_path).get("pid") == second, what="the new one beating")


def test_a_worker_writing_garbage_does_not_take_the_helper_down(start_server, tmp_path) -> None:
    server = start_server(preload=("tests.background_app",), env={"ZYGOTE_TEST_DIR": str(tmp_path)})
    helper = wait_until(lambda: server.stats()["helper_pid"], what="the helper")
    client = server.client(timeout=30)
    client.spawn("tests.background_app:send_garbage").result()
    wait_until(lambda: server.stats()["background_dropped"] == 3, what="3 drops counted")
    client.spawn("tests.background_app:report", 1, 1).result()
    wait_until((tmp_path / "collected").exists, what="a message after the garbage")
    stats = server.stats()
    assert stats["helper_pid"] == helper and stats["helper_restarts"] == 0


def test_sends_after_the_generation_retired_are_dropped_and_counted(start_server, tmp_path) -> None:
    """The old generation's helper stops with its zygote; its workers that
    still run find no helper: send() says so, counts, and never raises."""
    server = start_server(preload=("tests.background_app",), env={"ZYGOTE_TEST_DIR": str(tmp_path)})
    first = wait_until(lambda: server.stats()["helper_pid"], what="the helper")
    old_zygote = server.stats()["zygote_pid"]
    client = server.client(timeout=60)
    late = client.spawn("tests.background_app:send_after", str(tmp_path / "go"))
    assert client.reload() == 2
    # The helper goes first, then its zygote, which holds the channel's
    # receiving end until it exits: until then a send still finds a reader
    # (CI on 3.13 once sent in between).
    wait_until(lambda: not os.path.exists(f"/proc/{first}"), what="the old helper gone")
    wait_until(lambda: not os.path.exists(f"/proc/{old_zygote}"), what="the old zygote gone")
    (tmp_path / "go").write_text("")
    assert late.result() == [False, False, False]
    assert late.wait().exit_code == 0
    wait_until(lambda: server.stats()["background_dropped"] == 3, what="3 drops counted")
