"""Job control and batch runs from the command line, and Ctrl-C in a batch:
real `zygote` subprocesses against a live server."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import REPO, Server, wait_until, zygote_cli

ZYGOTE = [sys.executable, "-m", "zygote"]


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return zygote_cli(*args, env={"ZYGOTE_ENDPOINT": server.endpoint})


def listed(server: Server) -> list[dict]:
    result = cli(server, "jobs", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_detach_then_result_with_an_exit_status_per_outcome(shared_start_server) -> None:
    server: Server = shared_start_server()
    detached = cli(server, "spawn", "--detach", "tests.tasks:sleep", "0.5", '"slept"')
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    assert cli(server, "result", job_id).stdout.strip() == '"slept"'

    raised = cli(server, "spawn", "tests.tasks:raise_value_error", "nope")
    assert raised.returncode == 1
    assert "ValueError: nope" in raised.stderr and "Traceback" in raised.stderr
    lost = cli(server, "spawn", "tests.tasks:segfault")
    assert lost.returncode == 3 and "SIGSEGV" in lost.stderr
    unknown = cli(server, "result", "no-such-job")
    assert unknown.returncode == 4 and "no such job" in unknown.stderr
    refused = cli(server, "spawn", "--detach", "tests.tasks:add", "--timeout", "-1")
    assert refused.returncode == 1 and "timeout" in refused.stderr


def test_jobs_lists_running_and_queued_and_kill_stops_them(start_server) -> None:
    server: Server = start_server("--max-workers", "1", "--prefork", "0")
    ids = [
        cli(server, "spawn", "--detach", "tests.tasks:sleep", "30").stdout.strip() for _ in range(2)
    ]
    jobs = wait_until(lambda: (j := listed(server)) and j[0]["state"] == "running" and j)
    assert [job["id"] for job in jobs] == ids
    assert [job["state"] for job in jobs] == ["running", "queued"]
    assert jobs[0]["pid"] > 0 and jobs[0]["task"] == "tests.tasks:sleep"
    assert jobs[1]["pid"] is None and jobs[1]["runtime"] is None
    table = cli(server, "jobs").stdout
    assert ids[0] in table and "running" in table and "queued" in table

    assert cli(server, "kill", ids[1]).returncode == 0  # the queued one never starts
    killed = cli(server, "kill", ids[0], "--signal", "KILL")
    assert killed.returncode == 0 and "SIGKILL" in killed.stdout
    assert cli(server, "result", ids[0]).returncode == 3
    wait_until(lambda: listed(server) == [], what="no jobs left")
    assert cli(server, "kill", ids[0]).returncode == 4
    assert cli(server, "jobs").stdout.strip() == "no jobs queued or running"


def test_map_writes_results_in_input_order_and_reports_each_failure(
    shared_start_server, tmp_path: Path
) -> None:
    server: Server = shared_start_server()
    lines = ['[0.3, "a"]', '{"args": [0, "b"]}', "5", '{"kwargs": {"nope": 1}}', "[0, 3]"]
    (tmp_path / "args.jsonl").write_text("\n".join(lines) + "\n")
    result = cli(server, "map", "tests.tasks:sleep", "--args-file", str(tmp_path / "args.jsonl"))
    assert result.stdout.splitlines() == ['"a"', '"b"', "null", "null", "3"]
    assert result.returncode == 1
    assert "line 3: expected a list of arguments" in result.stderr
    assert "item 4: TypeError" in result.stderr and "2 of 5 failed" in result.stderr
    piped = subprocess.run(
        [sys.executable, "-m", "zygote", "map", "tests.tasks:add", "--args-file", "-"],
        input="[1, 2]\n[3, 4]\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "ZYGOTE_ENDPOINT": server.endpoint},
        timeout=60,
    )
    assert (piped.returncode, piped.stdout.split()) == (0, ["3", "7"])


def test_map_shows_progress_on_a_terminal(shared_start_server, tmp_path: Path) -> None:
    server: Server = shared_start_server()
    args = tmp_path / "args.jsonl"
    args.write_text("".join(f"[{i}, {i}]\n" for i in range(20)))
    terminal, stderr = pty.openpty()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "zygote", "map", "tests.tasks:add", "--args-file", str(args)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
            env={**os.environ, "ZYGOTE_ENDPOINT": server.endpoint},
            timeout=60,
        )
        os.close(stderr)
        shown = b""
        while chunk := _read(terminal):
            shown += chunk
    finally:
        os.close(terminal)
    assert run.returncode == 0
    assert run.stdout.split() == [str(2 * i).encode() for i in range(20)]
    assert b"[##############################] 20/20" in shown


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the other end is closed
        return b""


def start_map(server: Server, tmp_path: Path, lines: str) -> subprocess.Popen[bytes]:
    """`zygote map tests.tasks:sleep` over `lines`, 4 in flight, in the background."""
    args = tmp_path / "args.jsonl"
    args.write_text(lines)
    return subprocess.Popen(
        [*ZYGOTE, "map", "tests.tasks:sleep", "--args-file", str(args), "--max-in-flight", "4"],
        cwd=REPO,
        env={**os.environ, "ZYGOTE_ENDPOINT": server.endpoint},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_ctrl_c_in_map_cancels_the_batch(shared_start_server, tmp_path: Path) -> None:
    server: Server = shared_start_server("--max-workers", "2", "--prefork", "0")
    accepted = server.stats()["accepted"]
    mapping = start_map(server, tmp_path, "[60]\n" * 6)
    try:
        wait_until(lambda: [j["state"] for j in listed(server)] == ["running"] * 2 + ["queued"] * 2)
        mapping.send_signal(signal.SIGINT)
        _, err = mapping.communicate(timeout=30)
        assert mapping.returncode == 130 and b"interrupted" in err
        wait_until(lambda: listed(server) == [], what="the batch's jobs gone")
        assert server.stats()["accepted"] == accepted + 4  # the last two were never sent
    finally:
        mapping.kill()


def test_ctrl_c_in_python_map_cancels_the_batch(shared_start_server) -> None:
    server: Server = shared_start_server("--max-workers", "2", "--prefork", "0")
    with server.client(timeout=60) as z:

        def interrupt_when_running() -> None:
            with server.client(timeout=30) as watcher:
                wait_until(lambda: len(watcher.jobs()) == 3, what="the batch in flight")
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, while map() waits

        interrupter = threading.Thread(target=interrupt_when_running)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            list(z.map("tests.tasks:sleep", [60, 60, 60, 60], max_in_flight=3))
        interrupter.join(30)
        wait_until(lambda: z.jobs() == [], what="the batch's jobs gone")


def test_map_relays_output_and_cancels_when_its_reader_goes(
    shared_start_server, tmp_path: Path
) -> None:
    server: Server = shared_start_server("--max-workers", "2", "--prefork", "0")
    mapping = start_map(server, tmp_path, "[0]\n[1]\n[60]\n[60]\n")
    try:
        assert mapping.stdout is not None
        assert mapping.stdout.readline() == b"null\n"  # the first result, then we go
        mapping.stdout.close()  # like `| head -1` exiting: the next result's write fails
        _, err = mapping.communicate(timeout=30)
        assert mapping.returncode == 1 and b"stdout closed" in err
        wait_until(lambda: listed(server) == [], what="the batch's jobs gone")
    finally:
        mapping.kill()
    (tmp_path / "words.jsonl").write_text('["hello"]\n["world"]\n')
    shown = cli(server, "map", "builtins:print", "--args-file", str(tmp_path / "words.jsonl"))
    assert shown.returncode == 0 and shown.stdout.split() == ["null", "null"]
    assert shown.stderr.split() == ["hello", "world"]  # the tasks' output, in order
