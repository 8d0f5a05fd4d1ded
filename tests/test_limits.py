"""Worker limits (docs/cleanup-and-limits.md): --worker-memory,
--worker-cpu-seconds, --worker-nofile, a spawn's `_limits`, and --user."""

from __future__ import annotations

import asyncio
import os
import pwd
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

import zygote.aio
from zygote import WorkerLost

from .conftest import Server

MiB = 1 << 20


@pytest.fixture
def limited(shared_start_server) -> Server:
    """Shared by the tests here (tests/conftest.py: SharedServers): a job a
    limit ends leaves the server as it was."""
    return shared_start_server(
        "--worker-memory", "64M", "--worker-nofile", "128", "--prefork", "1", "--no-cgroups"
    )


def _lost(handle) -> WorkerLost:
    with pytest.raises(WorkerLost) as info:
        handle.result()
    return info.value


def test_memory_over_the_limit_ends_the_job_naming_it(limited: Server) -> None:
    client = limited.client(timeout=20)
    lost = _lost(client.spawn("tests.leftovers:allocate", 256 * MiB))
    assert lost.limit == "memory" and "memory limit of 67108864 bytes" in str(lost)
    assert client.spawn("tests.leftovers:allocate", 16 * MiB).result() == 16 * MiB
    # A spawn may lower the server's limit, never raise it.
    lowered = client.spawn("tests.leftovers:allocate", 16 * MiB, _limits={"memory": 4 * MiB})
    assert _lost(lowered).limit == "memory"
    raised = client.spawn("tests.leftovers:allocate", 256 * MiB, _limits={"memory": 1 << 40})
    assert _lost(raised).limit == "memory"


def test_open_files_over_the_limit_end_the_job_naming_it(limited: Server) -> None:
    client = limited.client(timeout=20)
    assert _lost(client.spawn("tests.leftovers:open_files", 200)).limit == "nofile"
    assert client.spawn("tests.leftovers:open_files", 20).result() == 20
    lowered = client.spawn("tests.leftovers:open_files", 20, _limits={"nofile": 16})
    assert _lost(lowered).limit == "nofile"


def test_cpu_time_over_the_limit_ends_the_job_naming_it(limited: Server) -> None:
    client = limited.client(timeout=20)
    lost = _lost(client.spawn("tests.leftovers:burn_cpu", 30, _limits={"cpu_seconds": 1}))
    assert lost.limit == "cpu_seconds" and lost.signal == 24  # SIGXCPU
    assert "CPU time limit of 1 s" in str(lost)


def test_asyncio_client_carries_limits_and_rejects_bad_ones(limited: Server) -> None:
    async def main() -> str | None:
        async with zygote.aio.Zygote(limited.endpoint, timeout=20) as client:
            handle = await client.spawn(
                "tests.leftovers:allocate", 256 * MiB, _limits={"memory": MiB}
            )
            try:
                await handle.result()
            except WorkerLost as exc:
                return exc.limit
            return None

    assert asyncio.run(main()) == "memory"
    client = limited.client(timeout=20)
    for bad in ({"disk": 1}, {"memory": 0}, {"nofile": "many"}):
        with pytest.raises(ValueError):
            client.spawn("tests.tasks:add", 1, 2, _limits=bad)


# -- --user / --group ----------------------------------------------------------

USER = "zygote-test"


def _acl(uid: int) -> bytes:
    """A POSIX ACL (the xattr's binary form) granting `uid` search (x) on
    a directory otherwise 0700: user::rwx, user:uid:--x, group::---,
    mask::--x, other::---."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 7, undefined), (0x02, 1, uid), (0x04, 0, undefined)]
    entries += [(0x10, 1, undefined), (0x20, 0, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.fixture
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    """A system user who can run this interpreter. Where the interpreter
    lives in a 0700 home (here: /root/.pyenv), that user is granted search
    permission on that one directory, by an ACL removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("--user needs root")
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )
        entry = pwd.getpwnam(USER)
    granted: list[tuple[str, int]] = []
    try:
        while not _can_run(entry.pw_uid):
            closed = _first_closed_directory(os.path.realpath(sys.executable))
            if closed is None or granted:
                pytest.fail(f"user {USER} cannot run {sys.executable}")
            granted.append((closed, os.stat(closed).st_mode & 0o7777))
            os.setxattr(closed, "system.posix_acl_access", _acl(entry.pw_uid))
        yield entry
    finally:
        for path, mode in granted:
            os.removexattr(path, "system.posix_acl_access")
            os.chmod(path, mode)  # the ACL's mask left its mark on the group bits


def _can_run(uid: int) -> bool:
    try:
        check = [sys.executable, "-c", "import zygote"]
        return subprocess.run(check, user=uid, capture_output=True).returncode == 0
    except PermissionError:
        return False


def _first_closed_directory(path: str) -> str | None:
    """The first directory on the way to `path` that others cannot search."""
    parts = path.split(os.sep)[1:]
    for i in range(1, len(parts)):
        directory = os.sep + os.path.join(*parts[:i])
        if not os.stat(directory).st_mode & 0o001:
            return directory
    return None


def test_user_runs_the_zygote_and_workers_unprivileged(start_server, unprivileged_user) -> None:
    server = start_server("--user", USER, "--prefork", "1")
    client = server.client(timeout=20)
    uid, gid, _ = client.spawn("tests.leftovers:identity").result()
    assert (uid, gid) == (unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    # The supervisor stays root (it manages the cgroups), and cleanup still works.
    stats = server.stats()
    assert os.stat(f"/proc/{server.pid}").st_uid == 0
    assert os.stat(f"/proc/{stats['zygote_pid']}").st_uid == unprivileged_user.pw_uid
    assert stats["cleanup"] == "cgroup"
    assert os.path.basename(stats["cgroup"]) in client.spawn("tests.leftovers:cgroup").result()
