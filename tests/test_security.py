"""Security, tried as an attacker would against live servers: CURVE on tcp,
the task allow-list, job ownership, ipc socket paths, import roots."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

import zygote.aio
from zygote import Zygote
from zygote.errors import ServerUnavailable, SpawnError, TaskError, WorkerLost, ZygoteError
from zygote.protocol import Kill

from .conftest import REPO, Server, wait_until, zygote_cli

OTHER_USER = "zygote-other"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(*args: str, log: Path, umask: int = 0o022) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "zygote", "start", "--preload", "tests.tasks", *args]
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, umask=umask
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Keys:
    dir: Path

    def client(self, name: str, **kwargs: object) -> dict[str, object]:
        return {
            "curve_secret": str(self.dir / f"{name}.key_secret"),
            "curve_server": str(self.dir / "server.key"),
            **kwargs,
        }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    for name in ("server", "alice", "bob", "mallory"):
        result = zygote_cli("keygen", str(folder), "--name", name)
        assert result.returncode == 0, result.stderr
    clients = folder / "clients"
    clients.mkdir()
    for name in ("alice", "bob"):  # mallory has a key, but not one let in
        (clients / f"{name}.key").write_bytes((folder / f"{name}.key").read_bytes())
    return Keys(folder)


@pytest.fixture(scope="module")
def curve_server(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("curve") / "server.log"
    process = start(
        "--endpoint",
        endpoint,
        "--curve-secret",
        str(keys.dir / "server.key_secret"),
        "--curve-clients",
        str(keys.dir / "clients"),
        "--prefork",
        "0",
        log=log,
    )

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            with Zygote(endpoint, timeout=2, **keys.client("alice")) as z:  # type: ignore[arg-type]
                z.ping()
        except ZygoteError:
            return False
        return True

    try:
        wait_until(answers, 30, "the CURVE server")
        yield endpoint
    finally:
        stop(process)


# -- keys and tcp -------------------------------------------------------------


def test_keygen_writes_a_private_key_pair_and_never_overwrites(tmp_path: Path) -> None:
    result = zygote_cli("keygen", str(tmp_path / "k"), "--name", "web1")
    assert result.returncode == 0, result.stderr
    for name in ("web1.key", "web1.key_secret"):
        assert stat.S_IMODE((tmp_path / "k" / name).stat().st_mode) == 0o600
    assert "secret-key" in (tmp_path / "k" / "web1.key_secret").read_text()
    assert "secret-key" not in (tmp_path / "k" / "web1.key").read_text()
    again = zygote_cli("keygen", str(tmp_path / "k"), "--name", "web1")
    assert again.returncode != 0 and "not overwriting" in again.stderr


def test_tcp_without_keys_refuses_to_start() -> None:
    result = zygote_cli("start", "--endpoint", f"tcp://127.0.0.1:{free_port()}", timeout=30)
    assert result.returncode == 2
    assert "--curve-secret" in result.stderr and "--insecure" in result.stderr


@pytest.mark.parametrize(("host", "level"), [("127.0.0.1", "WARNING"), ("0.0.0.0", "CRITICAL")])
def test_insecure_tcp_starts_with_a_loud_warning(tmp_path: Path, host: str, level: str) -> None:
    port = free_port()
    process = start("--endpoint", f"tcp://{host}:{port}", "--insecure", log=tmp_path / "log")
    try:
        with Zygote(f"tcp://127.0.0.1:{port}", timeout=30) as z:
            assert z.spawn("tests.tasks:add", 1, 2).result() == 3
        lines = [line for line in (tmp_path / "log").read_text().splitlines() if "INSECURE" in line]
        assert len(lines) == 1 and f" {level} " in lines[0], lines
    finally:
        stop(process)


def test_an_authorized_key_spawns(curve_server: str, keys: Keys) -> None:
    with Zygote(curve_server, timeout=30, **keys.client("alice")) as z:  # type: ignore[arg-type]
        assert z.spawn("tests.tasks:add", 2, 3).result() == 5


@pytest.mark.parametrize(
    ("who", "error", "says"),
    [
        ("mallory", ZygoteError, "authentication failed: the server at .* refused our key"),
        # Told by the server's greeting, or (when the server resets the
        # connection first) as below.
        ("no keys", ZygoteError, "authentication failed.* requires? CURVE keys"),
        # Uncertain (a proxy with no server behind it looks the same), so
        # only after a few failures in a row, and as an unavailable server.
        ("wrong server key", ServerUnavailable, "authentication failed, or .*is curve_server"),
        ("a listener that hangs up", ServerUnavailable, "authentication failed, or no zygote"),
    ],
)
def test_an_unauthorized_client_is_told_within_seconds(
    curve_server: str, keys: Keys, who: str, error: type[ZygoteError], says: str
) -> None:
    settings: dict[str, object] = {
        "mallory": keys.client("mallory"),
        "wrong server key": keys.client("alice", curve_server=str(keys.dir / "bob.key")),
    }.get(who, {})
    endpoint = curve_server
    if who == "a listener that hangs up":
        listener = socket.create_server(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        hang_up = threading.Thread(target=_hang_up, args=(listener,), daemon=True)
        hang_up.start()
    began = time.monotonic()
    with (
        pytest.raises(error, match=says),
        Zygote(endpoint, timeout=60, **settings) as z,  # type: ignore[arg-type]
    ):
        z.spawn("tests.tasks:add", 1, 2)
    assert time.monotonic() - began < 5

    async def asynchronously() -> None:
        async with zygote.aio.Zygote(endpoint, timeout=60, **settings) as z:  # type: ignore[arg-type]
            await z.ping()

    began = time.monotonic()
    with pytest.raises(error, match=says):
        asyncio.run(asynchronously())
    assert time.monotonic() - began < 5


def _hang_up(listener: socket.socket) -> None:
    """Accept connections and close them at once, like a proxy whose backend is down."""
    with listener:
        while True:
            connection, _ = listener.accept()
            connection.close()


def test_the_cli_takes_its_keys_from_the_environment(curve_server: str, keys: Keys) -> None:
    env = {
        "ZYGOTE_CURVE_SECRET": str(keys.dir / "alice.key_secret"),
        "ZYGOTE_CURVE_SERVER": str(keys.dir / "server.key"),
    }
    result = zygote_cli("spawn", "tests.tasks:add", "4", "5", "--endpoint", curve_server, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "9", result.stderr
    plain = zygote_cli("status", "--endpoint", curve_server)
    assert plain.returncode != 0 and "authentication failed" in plain.stderr


# -- the allow-list -------------------------------------------------------------


def test_tcp_runs_only_the_preloaded_modules_tasks_by_default(
    curve_server: str, keys: Keys
) -> None:
    with Zygote(curve_server, timeout=30, **keys.client("alice")) as z:  # type: ignore[arg-type]
        accepted = z.stats()["accepted"]
        for task in ("os:system", "subprocess:check_output", "builtins:eval", "zygote.cli:main"):
            with pytest.raises(SpawnError, match="--allow-task") as caught:
                z.spawn(task, "id")
            assert repr(task) in str(caught.value)
        assert z.stats()["accepted"] == accepted  # refused before any fork
        # An allowed name that leads elsewhere: tests.tasks imports os.
        with pytest.raises(TaskError, match="posix:system") as refused:
            z.spawn("tests.tasks:os.system", "true").result()
        assert refused.value.exc_type == "PermissionError"


def test_an_allow_list_narrows_what_ipc_clients_run(start_server) -> None:
    server: Server = start_server("--allow-task", "tests.tasks:add", "--prefork", "0")
    with server.client(timeout=30) as z:
        assert z.spawn("tests.tasks:add", 1, 1).result() == 2
        with pytest.raises(SpawnError, match=r"--allow-task \(tests.tasks:add\)"):
            z.spawn("tests.tasks:echo", 1)


# -- job ownership ----------------------------------------------------------------


def test_a_job_belongs_to_the_key_that_spawned_it(curve_server: str, keys: Keys) -> None:
    alice_keys, bob_keys = keys.client("alice"), keys.client("bob")
    unknown = r"unknown handle '[^']+': no such job, or one long gone$"
    not_running = r"handle '[^']+' has no running worker$"
    with (
        Zygote(curve_server, timeout=30, **alice_keys) as alice,  # type: ignore[arg-type]
        Zygote(curve_server, timeout=30, **bob_keys) as bob,  # type: ignore[arg-type]
    ):
        running = alice.spawn("tests.tasks:sleep", 30)
        finished = alice.spawn("tests.tasks:add", 1, 2)
        wait_until(finished.done, 30, "a result")  # in, and not collected
        # Listed until its worker has exited, after its result.
        wait_until(lambda: [job["id"] for job in alice.jobs()] == [running.id], 30)
        assert bob.jobs() == []  # not even listed
        for job in (running, finished):
            with pytest.raises(ZygoteError, match=unknown):  # as for no job at all
                bob.attach(job.id)
            with pytest.raises(ZygoteError, match=not_running):  # as for no job at all
                bob._call(lambda req, job=job: Kill(req, job.id, 9), 30)  # type: ignore[misc]
        # A `collected` from Bob does not make the server forget Alice's result.
        bob._socket.send(msgpack.packb({"v": 1, "kind": "collected", "handles": [finished.id]}))
        bob.ping()
        with Zygote(curve_server, timeout=30, **alice_keys) as alice_again:  # type: ignore[arg-type]
            assert alice_again.attach(finished.id).result() == 3
            assert alice_again.attach(running.id).kill(9)
        with pytest.raises(WorkerLost):
            running.result(timeout=30)


def test_job_ids_are_not_guessable_nor_listed(start_server) -> None:
    # Server-made ids: tests/test_protocol_doc.py (§6).
    server: Server = start_server("--prefork", "0")
    with server.client(timeout=30) as z:
        running = z.spawn("tests.tasks:sleep", 30)
        assert re.fullmatch(r"[0-9a-f]{24}-\d+", running.id)
        assert running.id not in json.dumps(server.stats())
        running.kill(9)


# -- ipc paths --------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("needs root, to create a second user")
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(OTHER_USER)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="zys-", dir="/tmp"))
    try:
        yield folder
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_a_directory_others_can_write_is_refused(shared_dir: Path) -> None:
    shared_dir.chmod(0o777)
    result = zygote_cli("start", "--endpoint", f"ipc://{shared_dir}/z.sock", timeout=30)
    assert result.returncode == 2
    assert "other users can write to it" in result.stderr
    assert not (shared_dir / "z.sock").exists()


def test_in_a_sticky_directory_another_users_name_is_refused(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    shared_dir.chmod(0o1777)
    planted = shared_dir / "z.sock"
    planted.write_text("")
    os.chown(planted, other_user.pw_uid, other_user.pw_gid)
    result = zygote_cli("start", "--endpoint", f"ipc://{planted}", timeout=30)
    assert result.returncode == 2 and f"belongs to uid {other_user.pw_uid}" in result.stderr


def test_a_directory_another_user_owns_or_can_repoint_is_refused(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    theirs = shared_dir / "theirs"
    theirs.mkdir()
    theirs.chmod(0o1777)  # sticky, but its owner may still remove our socket
    os.chown(theirs, other_user.pw_uid, other_user.pw_gid)
    result = zygote_cli("start", "--endpoint", f"ipc://{theirs}/z.sock", timeout=30)
    assert result.returncode == 2 and f"belongs to uid {other_user.pw_uid}" in result.stderr
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    (shared_dir / "link").symlink_to(private)
    result = zygote_cli("start", "--endpoint", f"ipc://{shared_dir}/link/z.sock", timeout=30)
    assert result.returncode == 2 and "symlink" in result.stderr


def test_the_socket_is_private_whatever_the_umask(
    shared_dir: Path, other_user: pwd.struct_passwd, tmp_path: Path
) -> None:
    shared_dir.chmod(0o1777)  # like /tmp: anyone may reach the socket file
    path = shared_dir / "z.sock"
    process = start("--endpoint", f"ipc://{path}", log=tmp_path / "log", umask=0)
    try:
        with Zygote(f"ipc://{wait_until(lambda: path.exists() and path)}", timeout=30) as z:
            z.ping()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(7)\n"
        )
        # The system's interpreter: ours may sit where that user cannot go.
        attempt = subprocess.run(
            ["/usr/bin/python3", "-c", probe, str(path)], user=other_user.pw_uid, timeout=30
        )
        assert attempt.returncode == 7  # permission denied, as another user
    finally:
        stop(process)


def test_stop_leaves_a_socket_that_is_no_longer_its_own(start_server, tmp_path: Path) -> None:
    server: Server = start_server("--prefork", "0")
    path = Path(server.endpoint[len("ipc://") :])
    # Another server took the name since (say, over a socket it took for stale).
    path.rename(tmp_path / "old.sock")
    newcomer = socket.socket(socket.AF_UNIX)
    newcomer.bind(str(path))
    try:
        server.process.terminate()
        assert server.wait_exit() == 0
        assert path.exists() and stat.S_ISSOCK(path.lstat().st_mode)
    finally:
        newcomer.close()


# -- import roots ----------------------------------------------------------------


def test_a_jobs_working_directory_is_not_an_import_root(start_server, tmp_path: Path) -> None:
    (tmp_path / "colorsys.py").write_text("raise SystemExit('planted module ran')\n")
    server: Server = start_server("--prefork", "0", env={"PYTHONPATH": "."})
    with server.client(timeout=30) as z:
        where = z.spawn("tests.tasks:module_file", "colorsys", _cwd=str(tmp_path)).result()
        assert where is not None and not where.startswith(str(tmp_path))
        assert z.spawn("tests.tasks:cwd", _cwd=str(tmp_path)).result() == str(tmp_path)
