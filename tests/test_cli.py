"""The `zygote` command line (core #1 and the CLI surface)."""

from __future__ import annotations

import json
import os

from .conftest import Server, wait_until, zygote_cli


def test_spawn_examples_add_prints_5(shared_start_server) -> None:
    server = shared_start_server(preload=("examples.tasks",))
    proc = zygote_cli("spawn", "examples.tasks:add", "2", "3", "--endpoint", server.endpoint)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "5\n"


def test_spawn_reads_args_as_json_else_string(shared_server: Server) -> None:
    proc = zygote_cli(
        "spawn",
        "tests.tasks:echo",
        "1.5",
        "[1, 2]",
        "hello",
        '{"a": null}',
        "--kw",
        "flag=true",
        "--kw",
        "name=zed",
        env={"ZYGOTE_ENDPOINT": shared_server.endpoint},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "args": [1.5, [1, 2], "hello", {"a": None}],
        "kwargs": {"flag": True, "name": "zed"},
    }


def test_spawn_failure_exits_nonzero_with_remote_traceback(shared_server: Server) -> None:
    proc = zygote_cli(
        "spawn", "tests.tasks:raise_value_error", "oops", "--endpoint", shared_server.endpoint
    )
    assert proc.returncode == 1
    assert "ValueError: oops" in proc.stderr
    assert "Traceback" in proc.stderr
    assert proc.stdout == ""


def test_spawn_without_server_is_a_clear_error(tmp_path) -> None:
    proc = zygote_cli("spawn", "tests.tasks:add", "1", "2", "--endpoint", f"ipc://{tmp_path}/none")
    assert proc.returncode == 1
    assert "no zygote server at" in proc.stderr


def test_status_table_and_json(shared_server: Server) -> None:
    table = zygote_cli("status", "--endpoint", shared_server.endpoint)
    assert table.returncode == 0, table.stderr
    assert "zygote state" in table.stdout and "ready" in table.stdout
    raw = zygote_cli("status", "--json", "--endpoint", shared_server.endpoint)
    stats = json.loads(raw.stdout)
    assert stats["max_workers"] == 4 and stats["pid"] == shared_server.pid


def test_stop_waits_for_the_server_to_exit(server: Server) -> None:
    proc = zygote_cli("stop", "--endpoint", server.endpoint)
    assert proc.returncode == 0, proc.stderr
    assert server.process.poll() == 0
    assert not os.path.exists(server.endpoint[len("ipc://") :])


def test_settings_from_config_file_and_env(start_server, tmp_path) -> None:
    config = tmp_path / "zygote.toml"
    config.write_text('max-workers = 3\nqueue_size = 7\npreload = ["tests.tasks"]\n')
    server = start_server("--config", str(config), preload=(), env={"ZYGOTE_QUEUE_SIZE": "9"})
    stats = server.stats()
    assert stats["max_workers"] == 3  # from the file
    assert stats["queue_size"] == 9  # the environment beats the file
    with server.client(timeout=20) as client:
        assert client.spawn("tests.tasks:add", 1, 2).result() == 3


def test_command_line_beats_environment(start_server) -> None:
    server = start_server("--max-workers", "5", env={"ZYGOTE_MAX_WORKERS": "2"})
    assert server.stats()["max_workers"] == 5


def test_bad_config_is_a_usage_error(tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("max-wrokers = 3\n")
    proc = zygote_cli("start", "--config", str(config), "--endpoint", f"ipc://{tmp_path}/s")
    assert proc.returncode == 2
    assert "unknown setting 'max-wrokers'" in proc.stderr
    proc = zygote_cli("start", "--endpoint", "http://nope")
    assert proc.returncode == 2 and "endpoint must be" in proc.stderr


def test_second_server_on_same_endpoint_refuses(shared_server: Server) -> None:
    proc = zygote_cli("start", "--endpoint", shared_server.endpoint, timeout=30)
    assert proc.returncode == 2
    assert "already listening" in proc.stderr
    wait_until(lambda: shared_server.stats()["state"] == "running")
