"""Per-job cleanup (docs/cleanup-and-limits.md): what a task leaves behind —
a plain child, a setsid double-forked daemon — is killed when its job ends,
when the server stops, and (with cgroups) when the supervisor is SIGKILLed.
Both ways run here: cgroup v2 (the default where the hierarchy is
writable) and process groups (`--no-cgroups`)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from zygote import cgroups

from .conftest import Server, wait_until

MODES = {"cgroup": (), "process-group": ("--no-cgroups",)}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _start(start_server: Callable[..., Server], mode: str, *args: str) -> Server:
    server = start_server("--max-workers", "2", "--prefork", "1", *MODES[mode], *args)
    assert server.stats()["cleanup"] == mode  # cgroup v2 is writable here: no silent fallback
    return server


def _pids(pidfile: Path) -> list[int]:
    wait_until(pidfile.exists, what="the task to start its processes")
    return [int(pid) for pid in pidfile.read_text().split()]


@pytest.mark.parametrize("mode", MODES)
def test_what_a_task_leaves_behind_is_killed_when_its_job_ends(start_server, mode: str) -> None:
    server = _start(start_server, mode)
    client = server.client(timeout=20)
    handle = client.spawn("tests.leftovers:leave_behind")
    plain, daemon = handle.result()
    assert handle.wait().exit_code == 0
    wait_until(lambda: _gone(plain) and _gone(daemon), timeout=5, what="the leftovers to die")
    assert server.stats()["cleanup_killed"] >= 1
    # The next job is unaffected.
    assert client.spawn("tests.tasks:add", 1, 2).result() == 3


def test_every_task_runs_in_a_cgroup_of_its_own_however_it_starts(start_server) -> None:
    # The move into it happens on the supervisor's mover thread; whatever
    # way the task reaches the child, it must not run before the move.
    server = _start(start_server, "cgroup")
    client = server.client(timeout=20)
    root = server.stats()["cgroup"].removeprefix(str(cgroups.unified_mount()))
    places = [client.spawn("tests.leftovers:cgroup").result()]  # the ready pool's child
    on_demand = [client.spawn("tests.leftovers:cgroup") for _ in range(2)]  # with the fork
    places += [handle.result() for handle in on_demand]
    big = b"x" * (128 * 1024)  # too big to travel with the fork: sent down the channel
    places.append(client.spawn("tests.leftovers:cgroup", big).result())
    assert len(set(places)) == len(places), places
    for place in places:
        parent, name = place.rsplit("/", 1)
        assert parent == root and name.startswith("w") and name[1:].isdigit(), place


@pytest.mark.parametrize("mode", MODES)
def test_what_running_tasks_left_is_killed_when_the_server_stops(
    start_server, mode: str, tmp_path: Path
) -> None:
    server = _start(start_server, mode, "--shutdown-grace", "0", "--kill-grace", "1")
    client = server.client(timeout=20)
    client.spawn("tests.leftovers:leave_behind", 60, str(tmp_path / "pids"))
    pids = _pids(tmp_path / "pids")
    cgroup = server.stats()["cgroup"]
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    wait_until(lambda: all(map(_gone, pids)), timeout=5, what="the leftovers to die")
    if cgroup is not None:
        assert not os.path.exists(cgroup)


def test_after_a_supervisor_sigkill_nothing_survives_with_cgroups(
    start_server, tmp_path: Path
) -> None:
    server = _start(start_server, "cgroup")
    client = server.client(timeout=20)
    client.spawn("tests.leftovers:leave_behind", 60, str(tmp_path / "pids"))
    pids = _pids(tmp_path / "pids") + [p.pid for p in server.descendants()]
    assert len(_watchdogs(server)) == 1
    cgroup = server.stats()["cgroup"]
    os.kill(server.pid, signal.SIGKILL)
    # The daemon has no lifeline and no parent of ours: only the cgroup
    # (killed by the watchdog) takes it.
    wait_until(lambda: all(map(_gone, pids)), timeout=3, what="everything to die")
    wait_until(lambda: not os.path.exists(cgroup), timeout=3, what="the cgroup to go")


def _watchdogs(server: Server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.pid).children() if p.name() == "zygote-watchdog"]


def test_a_killed_watchdog_is_replaced(start_server) -> None:
    server = _start(start_server, "cgroup")
    (watchdog,) = _watchdogs(server)
    watchdog.kill()
    wait_until(
        lambda: [p for p in _watchdogs(server) if p.pid != watchdog.pid], what="a new watchdog"
    )
    assert "the cgroup watchdog" in server.log()


@pytest.mark.parametrize(
    ("superoptions", "favored"),
    [("rw", False), ("rw,favordynmods", True), ("rw,nsdelegate,favordynmods", True)],
)
def test_the_favordynmods_mount_option_is_read(tmp_path: Path, superoptions: str, favored: bool):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "30 1 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755\n"
        f"41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 {superoptions}\n"
    )
    assert cgroups.favors_dynmods(str(mountinfo)) is favored
    assert cgroups.favors_dynmods(str(tmp_path / "missing")) is False
