"""The package's rooms by process role: what a zygote or worker imports must
never bring ZeroMQ along (libzmq starts threads, and a process that forks
must have none)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import zygote.child

from .conftest import REPO

CHILD_MODULES = sorted(
    f"zygote.child.{info.name}" for info in pkgutil.iter_modules(zygote.child.__path__)
)


def test_the_child_side_has_the_fork_server_and_the_worker() -> None:
    assert {"zygote.child.forkserver", "zygote.child.worker"} <= set(CHILD_MODULES)


def test_importing_the_child_side_loads_no_zmq() -> None:
    # What a zygote imports: the package (hooks for preloaded code) and every
    # module of its room. A fresh interpreter: this one has zmq already.
    imports = "; ".join(f"import {name}" for name in ["zygote", *CHILD_MODULES])
    code = f"import sys; {imports}; print(sorted(m for m in sys.modules if 'zmq' in m))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"the child side imported {proc.stdout.strip()}"


def test_the_server_side_does_load_zmq() -> None:
    # The check above can fail: the same probe sees zmq where it is imported.
    code = "import sys, zygote.server.supervisor; print('zmq' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert proc.stdout.strip() == "True", proc.stderr
