"""The process model: who dies with whom, who survives whom (core #5, #6, #8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from zygote.linux import native_threads

from .conftest import REPO, Server, wait_until


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_zygote_is_single_threaded_and_supervisor_never_imports_preload(
    start_server, tmp_path
) -> None:
    marker = tmp_path / "imports"
    server = start_server(env={"ZYGOTE_TEST_IMPORT_MARKER": str(marker)})
    client = server.client(timeout=20)
    assert client.spawn("tests.tasks:add", 1, 1).result() == 2
    zygote_pid = server.zygote_pid()
    assert list(native_threads(zygote_pid).keys()) == [zygote_pid]
    assert not any(name.startswith("ZMQ") for name in native_threads(zygote_pid).values())
    # The supervisor does have ZeroMQ's threads: that is why it never forks.
    assert any(name.startswith("ZMQ") for name in native_threads(server.pid).values())
    importers = {int(line) for line in marker.read_text().split()}
    assert importers == {zygote_pid}


def test_supervisor_sigkill_takes_zygote_and_workers_down(server: Server, tmp_path) -> None:
    client = server.client(timeout=20)
    handles = [client.spawn("tests.tasks:sleep", 60) for _ in range(3)]
    zygote_pid = server.zygote_pid()
    pids = [zygote_pid, *(h.pid for h in handles)]
    assert not any(_gone(pid) for pid in pids)
    os.kill(server.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(
        lambda: all(_gone(pid) for pid in pids),
        timeout=2.0,
        what="zygote and workers to die with the supervisor",
    )
    assert time.monotonic() - killed < 2.0


def test_zygote_sigkill_spares_workers_and_loses_no_request(server: Server, tmp_path) -> None:
    client = server.client(timeout=30)
    go = tmp_path / "go"
    running = [client.spawn("tests.tasks:wait_for_file", str(go)) for _ in range(2)]
    old_zygote = server.zygote_pid()
    os.kill(old_zygote, signal.SIGKILL)
    # Sent while the supervisor notices the death and boots a new zygote.
    during = client.map("tests.tasks:identity", range(6), max_in_flight=6)
    # The orphaned workers now belong to the supervisor (the subreaper).
    wait_until(
        lambda: all(psutil.Process(h.pid).ppid() == server.pid for h in running),
        what="workers re-parented to the supervisor",
    )
    go.write_text("go")
    assert [h.result() for h in running] == [h.pid for h in running]
    assert [h.wait().exit_code for h in running] == [0, 0]
    assert list(during) == list(range(6))
    new_zygote = server.zygote_pid()
    assert new_zygote != old_zygote
    stats = server.stats()
    assert stats["generation"] == 2 and stats["zygote_restarts"] == 1
    assert client.spawn("tests.tasks:add", 2, 2).generation == 2
    assert "zygote generation 1" in server.log() and "lost" in server.log()


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("no_such_module", "ModuleNotFoundError: No module named 'no_such_module'"),
        ("tests.boom", "RuntimeError: boom at import time"),
    ],
)
def test_preload_failure_exits_nonzero_with_traceback(module: str, expected: str) -> None:
    endpoint = f"ipc:///tmp/zyt-preload-{os.getpid()}.sock"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "zygote", "start", "--preload", module, "--endpoint", endpoint],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert time.monotonic() - started < 10
    assert "Traceback (most recent call last)" in proc.stderr
    assert expected in proc.stderr
    assert not os.path.exists(endpoint[len("ipc://") :])
