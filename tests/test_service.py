"""A service's life: systemd notifications, the pidfile, log files and json
lines, process titles."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from zygote.linux import sd_notify
from zygote.logs import JsonFormatter

from .conftest import REPO, Server, wait_until


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """What systemd listens on: an abstract datagram socket, and its $NOTIFY_SOCKET."""
    name = f"zyt-notify-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(30)
    yield sock, "@" + name
    sock.close()


def _until(sock: socket.socket, word: str) -> list[str]:
    """The notifications received up to the first one with `word` in it."""
    seen = []
    while not seen or word not in seen[-1]:
        seen.append(sock.recv(4096).decode())  # the socket's timeout is the deadline
    return seen


def test_notify_ready_once_zygotes_serve_and_stopping_on_stop(start_server, notify_socket) -> None:
    sock, address = notify_socket
    server = start_server(
        "--profile", "other=tests.tasks", env={"NOTIFY_SOCKET": address}, wait=False
    )
    seen = _until(sock, "READY=1")
    # READY=1 came after both profiles' zygotes were ready, with what serves.
    stats = server.stats()
    assert stats["zygote_state"] == "ready"
    assert stats["profiles"]["other"]["zygote_state"] == "ready"
    assert "STATUS=serving, generation 1 (other 1), up to" in seen[-1]
    assert all("READY=1" not in line for line in seen[:-1])
    client = server.client(timeout=30)
    # Only the supervisor speaks to systemd: its children do not inherit the socket.
    assert client.spawn("tests.tasks:env", "NOTIFY_SOCKET").result() is None
    client.reload()
    assert "STATUS=serving, generation 2" in _until(sock, "generation 2")[-1]
    server.process.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in _until(sock, "STOPPING=1")[-1]
    assert server.wait_exit() == 0


def test_sd_notify_to_a_path(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        assert sd_notify(str(tmp_path / "notify"), "STATUS=hello")
        assert sock.recv(100) == b"STATUS=hello"
    assert not sd_notify(None, "READY=1")  # unset: nothing, silently
    assert not sd_notify(str(tmp_path / "nobody"), "READY=1")


def test_pidfile_written_refused_while_live_and_removed(start_server, tmp_path: Path) -> None:
    pidfile = tmp_path / "zygote.pid"
    server = start_server("--pidfile", str(pidfile))
    assert pidfile.read_text() == f"{server.pid}\n"
    second = start_server("--pidfile", str(pidfile), wait=False)
    assert second.wait_exit() == 2
    assert f"names process {server.pid}, which is running" in second.log()
    assert pidfile.read_text() == f"{server.pid}\n"  # not taken from the live one
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not pidfile.exists()


def test_pidfile_of_a_dead_process_is_taken_over(start_server, tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    pidfile = tmp_path / "zygote.pid"
    pidfile.write_text(f"{gone.pid}\n")
    server = start_server("--pidfile", str(pidfile))
    assert pidfile.read_text() == f"{server.pid}\n"


def _helper_pid(server: Server) -> int:
    """The helper's pid, once its zygote has started it (after its boot)."""
    return int(wait_until(lambda: server.stats()["helper_pid"], what="the helper"))


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # a pool child that just ended
        return ""
    return " ".join(part.decode() for part in raw.split(b"\0") if part)


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")


def test_process_titles(start_server, tmp_path: Path) -> None:
    server = start_server(
        preload=("tests.tasks", "tests.background_app"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path)},
    )
    client = server.client(timeout=30)
    handle = client.spawn("tests.tasks:sleep", 30)
    zygote = server.zygote_pid()
    helper = _helper_pid(server)
    titles = {
        server.pid: f"zygote: supervisor {server.endpoint}",
        zygote: "zygote: zygote gen 1",
        helper: "zygote: helper gen 1",
        handle.pid: "zygote: worker tests.tasks:sleep",
    }
    for pid, title in titles.items():
        wait_until(lambda pid=pid, title=title: _cmdline(pid) == title, 5, f"{title!r}")
        assert _comm(pid) == title.encode()[:15].decode()  # what ps -o comm and top show
    # The ready pool's children, once refilled (a fork just made has its
    # zygote's title for a moment).
    wait_until(
        lambda: (
            {_cmdline(p.pid) for p in server.workers() if p.pid not in titles}
            == {"zygote: worker (idle)"}
        ),
        10,
        "idle pool children",
    )
    handle.kill(signal.SIGKILL)


def test_process_name_without_setproctitle() -> None:
    # Without the proctitle extra: prctl(PR_SET_NAME), 15 bytes, in comm only.
    code = (
        "import sys; sys.modules['setproctitle'] = None\n"
        "from zygote.linux import set_process_title\n"
        "set_process_title('zygote: worker x.y:z')\n"
        "print(open('/proc/self/comm').read().strip())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert out.stdout == "zygote: worker\n", out.stderr  # "zygote: worker " stripped


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for entry in lines:
        assert {"time", "level", "logger", "pid", "message"} <= entry.keys(), entry
    return lines


def test_json_logs_from_every_process(start_server, tmp_path: Path) -> None:
    server = start_server(
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
        preload=("tests.tasks", "tests.background_app"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path)},
    )
    zygote, helper = server.zygote_pid(), _helper_pid(server)
    client = server.client(timeout=30)
    assert client.spawn("tests.tasks:add", 2, 3).result() == 5
    client.reload()  # the old zygote logs that it retires (DEBUG)
    wait_until(lambda: server.stats()["zygote_pid"] != zygote, what="the reload")
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    pids = {entry["pid"] for entry in _json_lines(server.log())}  # every line parses
    assert {server.pid, zygote, helper} <= pids


def test_log_file_takes_every_process_lines(start_server, tmp_path: Path) -> None:
    log_file = tmp_path / "zygote.log"
    server = start_server(
        "--log-file",
        str(log_file),
        "--log-level",
        "DEBUG",
        preload=("tests.tasks", "tests.background_app"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path)},
    )
    zygote, helper = server.zygote_pid(), _helper_pid(server)
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    text = log_file.read_text()
    assert f"zygote[{server.pid}] zygote.supervisor: stopped (exit status 0)" in text
    assert f"zygote[{helper}] zygote.helper: helper running" in text
    assert f"zygote[{zygote}] zygote.zygote: control socket closed" in text
    assert server.log() == ""  # nothing left on stderr


def test_json_formatter_keeps_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "zygote.x", logging.ERROR, "f", 1, "a\nb %d", (1,), sys.exc_info()
        )
    entry = json.loads(JsonFormatter().format(record))
    assert (
        entry["message"] == "a\nb 1" and entry["level"] == "ERROR" and entry["pid"] == os.getpid()
    )
    assert "ValueError: boom" in entry["exc"]
    assert entry["time"].endswith("Z")


def test_bad_log_format_is_a_usage_error(start_server) -> None:
    server: Server = start_server("--log-format", "xml", wait=False)
    assert server.wait_exit() == 2
