"""Generations with real processes: refork (a warm worker promoted to be the
next zygote) and reload (a fresh exec), by request, by policy and by signal;
candidates that must be refused; the old generation serving on."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

import psutil
import pytest

from zygote import Zygote, ZygoteError

from .conftest import Server, wait_until

APP = ("tests.tasks", "tests.generations_app")


def refork_in_background(server: Server) -> tuple[threading.Thread, list[object]]:
    """Ask for a refork from another client, as `zygote refork` would; it is
    answered once a worker has finished a task and the new generation serves."""
    outcome: list[object] = []

    def ask() -> None:
        with Zygote(server.endpoint, timeout=60) as client:
            try:
                outcome.append(client.refork())
            except ZygoteError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    wait_until(lambda: server.stats()["refork_requested"], what="the refork request")
    return thread, outcome


@contextlib.contextmanager
def spawns_under_way(server: Server, spawn: Callable[[Zygote], object]) -> Iterator[list[object]]:
    """Two client threads calling `spawn(client)` in a loop until the block
    ends (it starts once 10 have come back): what each gave or raised."""
    seen: list[object] = []
    stop = threading.Event()

    def load() -> None:
        with Zygote(server.endpoint, timeout=30) as client:
            while not stop.is_set():
                try:
                    seen.append(spawn(client))
                except ZygoteError as exc:
                    seen.append(exc)

    loaders = [threading.Thread(target=load) for _ in range(2)]
    for loader in loaders:
        loader.start()
    try:
        wait_until(lambda: len(seen) >= 10, what="spawns under way")
        yield seen
    finally:
        stop.set()
        for loader in loaders:
            loader.join(30)


def promoted_server(start_server: Callable[..., Server]) -> tuple[Server, Zygote]:
    """A server (--prefork 0) whose generation 2 is a promoted worker, and a client."""
    server = start_server("--prefork", "0", preload=APP)
    client = server.client(timeout=30)
    thread, outcome = refork_in_background(server)
    client.spawn("tests.generations_app:lazy").result()
    thread.join(30)
    assert outcome == [2]
    return server, client


def test_refork_promotes_a_warm_worker(start_server: Callable[..., Server]) -> None:
    server = start_server("--prefork", "0", preload=APP)
    client = server.client(timeout=30)
    assert client.spawn("tests.generations_app:lazy").result()["was_loaded"] is False
    thread, outcome = refork_in_background(server)
    candidate = client.spawn("tests.generations_app:lazy")
    assert candidate.result()["was_loaded"] is False
    thread.join(30)
    assert outcome == [2]
    # The candidate's job ended as usual; its process went on as the zygote.
    exit_info = candidate.wait()
    assert exit_info.exit_code == 0 and exit_info.description == "became zygote generation 2"
    stats = server.stats()
    assert stats["zygote_pid"] == candidate.pid and stats["promoted_from"] == 1
    # Its children have what its task imported, and its before_refork hook ran.
    warm = client.spawn("tests.generations_app:lazy")
    assert warm.generation == 2
    assert warm.result() == {"was_loaded": True, "pid": warm.pid, "hooks_ran": 1}
    assert "generation 2 takes over from 1" in server.log()


def test_refork_by_policy(start_server: Callable[..., Server]) -> None:
    server = start_server("--prefork", "1", "--refork-after", "2", preload=APP)
    client = server.client(timeout=30)
    for _ in range(3):  # two spawns, then the candidate
        client.spawn("tests.generations_app:lazy").result()
    wait_until(lambda: server.stats()["generation"] == 2, what="generation 2")
    handle = client.spawn("tests.generations_app:lazy")
    assert handle.generation == 2 and handle.result()["was_loaded"] is True
    assert server.stats()["reforks"] == 1


@pytest.mark.parametrize(
    ("task", "reason"),
    [
        ("tests.generations_app:leave_thread", "a thread was left behind: Python thread 'poller'"),
        ("tests.generations_app:unsafe", "the task said so: it holds a connection in use"),
        ("tests.generations_app:poison", "its probe child failed: poison-check failed"),
    ],
)
def test_a_candidate_that_fails_is_discarded_and_the_old_generation_serves(
    start_server: Callable[..., Server], task: str, reason: str
) -> None:
    server = start_server("--prefork", "1", preload=APP)
    client = server.client(timeout=30)
    thread, outcome = refork_in_background(server)
    client.spawn(task).result()
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ZygoteError)
    assert reason in str(outcome[0])
    stats = server.stats()
    assert stats["generation"] == 1 and stats["refork_failures"] == 1
    handle = client.spawn("tests.tasks:add", 1, 2)
    assert handle.result() == 3 and handle.generation == 1


def test_running_workers_finish_across_the_switch(start_server: Callable[..., Server]) -> None:
    server = start_server("--prefork", "0", preload=APP)
    client = server.client(timeout=30)
    long = client.spawn("tests.tasks:sleep", 1.5, "done")
    thread, outcome = refork_in_background(server)
    client.spawn("tests.generations_app:lazy").result()
    thread.join(30)
    assert outcome == [2]
    assert long.result() == "done" and long.generation == 1
    assert long.wait().exit_code == 0


def test_a_promoted_zygote_killed_is_replaced_by_a_fresh_one(
    start_server: Callable[..., Server],
) -> None:
    server, client = promoted_server(start_server)
    os.kill(server.stats()["zygote_pid"], signal.SIGKILL)
    wait_until(lambda: server.stats()["generation"] == 3, what="generation 3")
    results = list(client.map("tests.tasks:identity", range(20)))
    assert results == list(range(20))
    stats = server.stats()
    assert stats["promoted_from"] is None and stats["zygote_restarts"] == 1


def test_signals_refork_and_reload(start_server: Callable[..., Server]) -> None:
    server = start_server("--prefork", "0", preload=APP)
    client = server.client(timeout=30)
    os.kill(server.pid, signal.SIGUSR2)  # refork: the next task's worker
    wait_until(lambda: server.stats()["refork_requested"], what="the refork request")
    os.kill(server.pid, signal.SIGUSR2)  # again, while it is pending: harmless
    client.spawn("tests.generations_app:lazy").result()
    wait_until(lambda: server.stats()["generation"] == 2, what="generation 2")
    os.kill(server.pid, signal.SIGHUP)  # reload: a fresh interpreter
    wait_until(
        lambda: server.stats()["generation"] == 3 and server.stats()["zygote_state"] == "ready",
        what="generation 3",
    )
    handle = client.spawn("tests.generations_app:lazy")
    assert handle.generation == 3 and handle.result()["was_loaded"] is False
    assert server.stats()["internal_errors"] == 0


def test_refork_with_nothing_running_waits_then_says_why(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--prefork", "0", "--refork-timeout", "0.5", preload=APP)
    with pytest.raises(ZygoteError, match=r"no worker finished a task within 0\.5s"):
        server.client(timeout=30).refork()
    assert server.stats()["generation"] == 1


def test_reload_under_load_serves_the_new_code_and_fails_no_spawn(
    start_server: Callable[..., Server], tmp_path
) -> None:
    module = tmp_path / "deployed.py"
    module.write_text("def version():\n    return 1\n")
    # No bytecode cache: the new source has the same size and may have the
    # same mtime second as the first, and would pass for what is cached.
    env = {"PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    server = start_server("--prefork", "2", preload=("tests.tasks", "deployed"), env=env)
    with spawns_under_way(server, lambda client: client.spawn("deployed:version").result()) as seen:
        module.write_text("def version():\n    return 2\n")
        with Zygote(server.endpoint, timeout=30) as client:
            assert client.reload() == 2
        wait_until(lambda: 2 in seen[-5:], timeout=30, what="the new code answering")
    errors = [item for item in seen if isinstance(item, Exception)]
    assert not errors and set(seen) == {1, 2}


def test_reforks_do_not_pile_up_the_old_helpers_descriptors(
    start_server: Callable[..., Server], tmp_path
) -> None:
    # A promoted worker inherited the old generation's background outbox;
    # attaching its own helper's must close the old one, every refork.
    server = start_server(
        "--prefork",
        "0",
        preload=("tests.tasks", "tests.background_app"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path)},
    )
    client = server.client(timeout=30)

    def descriptors(pid: int) -> list[str]:
        listing = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                listing.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        return sorted(listing)

    first: list[str] = []
    most = 0
    for generation in (2, 3, 4):
        thread, outcome = refork_in_background(server)
        client.spawn("tests.tasks:add", 1, 1).result()
        thread.join(30)
        assert outcome == [generation]
        # At rest: its helper up, its other children (the probe) gone: it
        # holds a pidfd per child until it has reaped it.
        stats = wait_until(lambda: (s := server.stats())["helper_pid"] and s, what="its helper")
        zygote = psutil.Process(stats["zygote_pid"])
        wait_until(
            lambda z=zygote, helper=stats["helper_pid"]: [c.pid for c in z.children()] == [helper],
            what="only the helper left",
        )
        if not first:
            first = descriptors(zygote.pid)
            most = len(first)
            continue
        # No more than generation 2 had, once at rest. A leak of one per
        # refork leaves generation 4 two above it, so it fails even if
        # generation 2 was counted during a transient one (CI saw one once,
        # [14, 13, 13]: generation 2 one above the later ones).
        wait_until(
            lambda pid=zygote.pid, most=most: len(descriptors(pid)) <= most,
            what=f"generation {generation} holding no more descriptors than generation 2 ({first})",
        )


def test_a_pending_refork_is_answered_when_the_server_stops(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--prefork", "0", preload=APP)
    thread, outcome = refork_in_background(server)
    server.client(timeout=30).stop()
    thread.join(10)
    assert len(outcome) == 1 and "shutting down" in str(outcome[0])


@pytest.mark.timeout(60)
def test_the_ready_pool_is_forked_again_from_the_new_generation(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--prefork", "2", preload=APP)
    client = server.client(timeout=30)
    wait_until(lambda: server.stats()["pool_ready"] == 2, what="the first pool")
    old = psutil.Process(server.stats()["zygote_pid"])
    old_pool = {child.pid for child in old.children()}
    assert len(old_pool) == 2
    thread, outcome = refork_in_background(server)
    client.spawn("tests.generations_app:lazy").result()  # a pool child: the candidate
    thread.join(30)
    assert outcome == [2]
    new = psutil.Process(server.stats()["zygote_pid"])

    def refreshed() -> bool:
        pool = {child.pid for child in new.children()}
        return server.stats()["pool_ready"] == 2 and len(pool) == 2 and not pool & old_pool

    wait_until(refreshed, what="two pool children of generation 2")
    # The old generation's other pool child is let go, not kept for its
    # code (the one that took the task is the new zygote).
    let_go = old_pool - {new.pid}
    assert len(let_go) == 1
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in let_go), what="old pool gone")
    for handle in [client.spawn("tests.generations_app:lazy") for _ in range(2)]:
        assert handle.generation == 2 and handle.result()["was_loaded"] is True


@pytest.mark.timeout(60)
def test_sighup_while_a_promoted_candidate_boots_reloads_after_the_refork(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--prefork", "0", preload=(*APP, "tests.slow_refork_app"))
    client = server.client(timeout=30)
    os.kill(server.pid, signal.SIGUSR2)
    wait_until(lambda: server.stats()["refork_requested"], what="the refork request")
    candidate = client.spawn("tests.generations_app:lazy")
    candidate.result()
    # The candidate is the incoming generation, in its 1 s before_refork hook.
    wait_until(lambda: server.stats()["incoming_generation"] == 2, what="generation 2 incoming")
    os.kill(server.pid, signal.SIGUSR2)  # a refork asked for again: harmless
    os.kill(server.pid, signal.SIGHUP)
    # Held until the refork is done, not instead of it (the signal is
    # handled by the loop, so not necessarily before the next request).
    wait_until(lambda: server.stats()["reload_pending"], what="the reload held back")
    assert candidate.wait().description == "became zygote generation 2"

    def reloaded() -> bool:
        stats = server.stats()
        return stats["generation"] == 3 and stats["zygote_state"] == "ready"

    wait_until(reloaded, timeout=30, what="generation 3, reloaded")
    stats = server.stats()
    assert stats["reforks"] == 1 and stats["promoted_from"] is None
    assert stats["reload_pending"] is False and stats["internal_errors"] == 0
    handle = client.spawn("tests.generations_app:lazy")
    assert handle.generation == 3 and handle.result()["was_loaded"] is False


@pytest.mark.timeout(60)
def test_spawns_under_way_when_a_promoted_zygote_is_killed_all_succeed(
    start_server: Callable[..., Server],
) -> None:
    server, _ = promoted_server(start_server)

    def spawn(client: Zygote) -> tuple[object, int]:
        handle = client.spawn("tests.tasks:identity", 7)
        return handle.result(), handle.generation

    with spawns_under_way(server, spawn) as seen:
        os.kill(server.stats()["zygote_pid"], signal.SIGKILL)
        wait_until(lambda: (7, 3) in seen[-5:], timeout=30, what="generation 3 answering")
    errors = [item for item in seen if isinstance(item, Exception)]
    assert not errors, errors
    assert {item[1] for item in seen if isinstance(item, tuple)} == {2, 3}
    assert server.stats()["zygote_restarts"] == 1
