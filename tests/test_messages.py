"""What a new user reads when something goes wrong (issue 13, point 7): each
message names the thing at fault, and only what is so."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import zygote.client
from zygote import TaskError, Zygote
from zygote.errors import ServerUnavailable
from zygote.handle import ExitInfo

from .conftest import REPO, Server, wait_until, zygote_cli


def test_failed_tasks_are_named_and_reported_without_zygotes_frames(shared_server: Server) -> None:
    env = {"ZYGOTE_ENDPOINT": shared_server.endpoint}
    nope = zygote_cli("spawn", "tests.tasks:nope", env=env)
    assert nope.returncode == 1
    assert (
        "task tests.tasks:nope not found: module 'tests.tasks' has no attribute 'nope'"
        in nope.stderr
    )
    missing = zygote_cli("spawn", "nosuchmodule:f", env=env)
    assert "task nosuchmodule:f not found: No module named 'nosuchmodule'" in missing.stderr
    raised = zygote_cli("spawn", "tests.tasks:raise_value_error", env=env)
    for output in (nope.stderr, missing.stderr, raised.stderr):
        assert "zygote/child" not in output and "importlib" not in output, output
    assert raised.stderr.startswith('Traceback (most recent call last):\n  File "')
    assert "tests/tasks.py" in raised.stderr.splitlines()[1]

    # The server's log says what the task did, not only how its process ended.
    wait_until(lambda: "tests.tasks:raise_value_error raised ValueError" in shared_server.log())
    assert "tests.tasks:nope raised AttributeError" in shared_server.log()

    # What msgpack cannot carry is named, with msgpack, both ways.
    client = shared_server.client(timeout=30)
    with pytest.raises(TypeError, match=r"^argument 2 \(object\) cannot be sent: msgpack "):
        client.spawn("tests.tasks:echo", 1, object())
    with pytest.raises(TypeError, match=r"^keyword argument 'x' \(set\) cannot be sent: msgpack"):
        client.spawn("tests.tasks:echo", x={1})
    with pytest.raises(TaskError, match=r"unserializable \(object\) cannot be sent: msgpack"):
        client.spawn("tests.tasks:unserializable").result()


def test_status_shows_units_and_no_python_noise_and_stop_shows_progress(
    server: Server, tmp_path: Path
) -> None:
    table = zygote_cli("status", "--endpoint", server.endpoint)
    assert table.returncode == 0, table.stderr
    assert not re.search(r"\bNone\b|\[\]|\{\}|\bFalse\b|\bTrue\b", table.stdout), table.stdout
    assert re.search(r"^uptime +\d+\.\d s$", table.stdout, re.M), table.stdout
    assert re.search(r"^max message bytes +16\.0 MiB$", table.stdout, re.M), table.stdout
    assert re.search(r"^incoming generation +-$", table.stdout, re.M), table.stdout

    # Stop while two jobs run: it says what it waits for, and is done when they are.
    gate = tmp_path / "go"
    client = server.client(timeout=30)
    handles = [client.spawn("tests.tasks:wait_for_file", str(gate)) for _ in range(2)]
    stop = subprocess.Popen(
        [sys.executable, "-m", "zygote", "stop", "--endpoint", server.endpoint],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert stop.stderr is not None
    assert stop.stderr.readline() == "waiting for 2 running jobs\u2026\n"  # (pytest-timeout)
    gate.touch()
    assert all(h.result() for h in handles)  # (their pids)
    assert stop.wait(30) == 0, stop.stderr.read()
    assert server.wait_exit() == 0


def test_stop_without_a_server_is_done_at_once(tmp_path: Path) -> None:
    proc = zygote_cli("stop", "--endpoint", f"ipc://{tmp_path}/none.sock")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"no server running at ipc://{tmp_path}/none.sock\n"


def test_no_server_at_a_tcp_endpoint_is_not_one_that_stopped_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(zygote.client, "PROBE_EVERY", 0.1)
    monkeypatch.setattr(zygote.client, "PROBE_TIMEOUT", 0.3)
    with socket.socket() as free:  # a port nobody listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    client = Zygote(f"tcp://127.0.0.1:{port}", timeout=10)
    with client, pytest.raises(ServerUnavailable, match=r"^no server answered at tcp://127\."):
        client.ping()


def test_bad_settings_name_where_they_came_from(tmp_path: Path) -> None:
    flag = zygote_cli("start", "--max-workers", "0")
    assert flag.returncode == 2
    assert "Invalid value for '--max-workers': 0 is not" in flag.stderr
    assert "ZYGOTE_MAX_WORKERS" not in flag.stderr
    env = zygote_cli("start", env={"ZYGOTE_MAX_WORKERS": "0"})
    assert "'--max-workers' (from $ZYGOTE_MAX_WORKERS): 0 is not" in env.stderr
    config = tmp_path / "zygote.toml"
    config.write_text('max_workers = "four"\n')
    toml = zygote_cli("start", "--config", str(config))
    assert f"'--max-workers' (from {config}): 'four' is not" in toml.stderr
    assert "ZYGOTE_MAX_WORKERS" not in toml.stderr


@pytest.mark.parametrize(
    ("endpoint", "words"),
    [
        ("foo", "endpoint must be ipc://PATH or tcp://HOST:PORT, not 'foo'"),
        ("tcp://127.0.0.1:99999", "must be a number from 1 to 65535 (or *), not '99999'"),
        ("tcp://nohost:1", "no address or network interface 'nohost' on this machine"),
        ("ipc:///nonexistent-zygote/dir/s.sock", "cannot create the directory"),
    ],
)
def test_a_bad_endpoint_is_one_clear_line(endpoint: str, words: str) -> None:
    proc = zygote_cli("start", "--endpoint", endpoint, "--insecure", "--log-level", "ERROR")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if words in line]
    assert len(lines) == 1, proc.stderr


def test_a_validator_failing_in_every_child_ends_the_server_naming_it(tmp_path: Path) -> None:
    proc = zygote_cli(
        "start",
        "--endpoint",
        f"ipc://{tmp_path}/s.sock",
        "--preload",
        "tests.tasks",
        "--validator",
        "tests.tasks:raise_value_error",
        "--corrupt-limit",
        "1",
        "--zygote-failure-limit",
        "2",
    )
    assert proc.returncode == 4, proc.stderr
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", proc.stderr.strip())
    last = records[-1]
    assert "stopped (exit status 4): 2 zygotes in a row failed" in last, proc.stderr
    assert "raise_value_error failed: ValueError: bad value" in last
    assert 'tests/tasks.py", line' in last and "zygote/child" not in last


def test_maxrss_is_explained() -> None:
    assert "the zygote's size" in (ExitInfo.__doc__ or "")
    assert "maxrss_kb" in (REPO / "README.md").read_text()
