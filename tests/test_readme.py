"""The README's promises: its two commands, its examples, the embedded defaults."""

from __future__ import annotations

import ast
import builtins
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

from zygote import Zygote
from zygote.errors import ZygoteError

from .conftest import REPO, Server, wait_until

README = (REPO / "README.md").read_text()


def _commands() -> list[str]:
    return re.findall(r"```sh\n(python3 -m venv .*?)\n```", README)


def test_readme_has_the_two_commands_and_ci_runs_the_test_one() -> None:
    run_server, run_tests = _commands()
    assert run_server.endswith(".venv/bin/zygote start")
    assert run_tests == (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    )
    ci = (REPO / ".ci" / "run").read_text()
    # .ci/run runs the same command with each interpreter and venv in place.
    command = (
        '"$1" -m venv "$2" && "$2/bin/pip" install -e \'.[test]\' && "$2/bin/python" -m pytest'
    )
    assert command in ci


def test_server_on_embedded_defaults_runs_the_readme_spawn(tmp_path: Path) -> None:
    # The default endpoint lives in $XDG_RUNTIME_DIR/zygote; point it at a
    # private place so a real server on this machine is not disturbed.
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    env.pop("ZYGOTE_ENDPOINT", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "zygote", "start"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        socket_path = tmp_path / "zygote" / "zygote.sock"
        wait_until(socket_path.exists, timeout=20, what="the default socket")
        assert oct((tmp_path / "zygote").stat().st_mode & 0o777) == "0o700"
        spawn = subprocess.run(
            [sys.executable, "-m", "zygote", "spawn", "examples.tasks:add", "2", "3"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert spawn.returncode == 0, spawn.stderr
        assert spawn.stdout == "5\n"
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0].decode()
    assert server.returncode == 0, output
    assert "listening on ipc://" in output and "stopped" in output


def test_batch_example_runs(shared_start_server) -> None:
    server: Server = shared_start_server(preload=("examples.tasks",))
    proc = subprocess.run(
        [sys.executable, "-m", "examples.batch", server.endpoint],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "16 squares" in proc.stdout and "[0, 1, 4, 9" in proc.stdout
    assert "raised RuntimeError: on purpose" in proc.stdout


def test_default_endpoint_comes_from_the_environment(shared_server: Server, monkeypatch) -> None:
    monkeypatch.setenv("ZYGOTE_ENDPOINT", shared_server.endpoint)
    with Zygote(timeout=20) as client:
        assert client.spawn("tests.tasks:add", 20, 22).result() == 42
    monkeypatch.setenv("ZYGOTE_ENDPOINT", shared_server.endpoint + ".missing")
    try:
        Zygote()
    except ZygoteError as exc:
        assert "no zygote server" in str(exc)
    else:
        raise AssertionError("expected ServerUnavailable")


PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_every_python_snippet_compiles_and_names_nothing_undefined() -> None:
    assert len(PYTHON_BLOCKS) >= 3
    for number, block in enumerate(PYTHON_BLOCKS):
        code = compile(block, f"README.md python block {number}", "exec")
        defined = set(dir(builtins)) | _assigned(block)
        undefined = {name for name in _names(code) if name not in defined}
        assert not undefined, f"block {number} uses undefined names {undefined}:\n{block}"


def _names(code: types.CodeType) -> set[str]:
    """Every global name the code (and the functions in it) loads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _assigned(block: str) -> set[str]:
    """What the block defines or imports at the top, and every attribute name
    (co_names has those too: `z.spawn` loads "spawn")."""
    tree = ast.parse(block)
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
            names |= {a.name for a in node.names}  # co_names holds the full name too
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def test_the_python_snippets_run(start_server, tmp_path: Path) -> None:
    # The preload example is a module a server preloads; the client ones
    # run against that server as written.
    preload, clients = PYTHON_BLOCKS[-1], PYTHON_BLOCKS[:-1]
    assert "@zygote.validator" in preload
    (tmp_path / "readme_preload.py").write_text(preload)
    server: Server = start_server(
        preload=("examples.tasks", "readme_preload"), env={"PYTHONPATH": str(tmp_path)}
    )
    with server.client(timeout=30) as client:
        assert client.spawn("readme_preload:task", 21).result() == 42
    for block in clients:
        proc = subprocess.run(
            [sys.executable, "-c", block],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "ZYGOTE_ENDPOINT": server.endpoint},
        )
        assert proc.returncode == 0, f"{block}\n{proc.stderr}"
        assert "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in proc.stdout
