"""Thread inventory, the fork gate and the built-in probes, in this process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import zygote
from zygote import hooks, inventory, validators


@pytest.fixture
def parked_thread():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="parked-for-test", daemon=True)
    thread.start()
    yield thread
    stop.set()
    thread.join(5)


def test_inventory_lists_python_threads_with_their_place(parked_thread) -> None:
    found = {t.name: t for t in inventory.take()}
    info = found["parked-for-test"]
    assert info.kind == "python" and info.daemon
    assert info.native_id == parked_thread.native_id
    assert "threading.py" in info.where and "in wait" in info.where
    assert not info.allowed
    assert "Python thread 'parked-for-test'" in info.describe()


def test_allowlist_patterns_and_fork_safe_marks(parked_thread) -> None:
    assert next(t for t in inventory.take(["parked-*"]) if t.name == "parked-for-test").allowed
    zygote.mark_fork_safe(parked_thread)
    try:
        assert next(t for t in inventory.take() if t.name == "parked-for-test").allowed
    finally:
        hooks.FORK_SAFE_THREADS.discard(parked_thread)


def test_signature_changes_with_the_set(parked_thread) -> None:
    before = inventory.signature(inventory.take())
    other = threading.Thread(target=time.sleep, args=(0.5,), name="second")
    other.start()
    try:
        assert inventory.signature(inventory.take()) != before
    finally:
        other.join()


def test_prevent_fork_outside_a_zygote_is_a_no_op() -> None:
    assert hooks.GATE is None
    with zygote.prevent_fork():
        pass


def test_fork_gate_counts_nested_sections_per_thread() -> None:
    gate = hooks.ForkGate()
    with gate.section():
        with gate.section():
            assert next(iter(gate.sections.values()))[2] == 2
        assert len(gate.sections) == 1
    assert gate.sections == {}


def test_logging_probe_finds_a_held_handler_lock() -> None:
    import logging

    handler = logging.Handler()
    try:
        held = threading.Thread(target=handler.lock.acquire)
        held.start()
        held.join()  # the lock stays held by a thread that no longer runs
        with pytest.raises(RuntimeError, match="is held"):
            validators.logging_locks()
    finally:
        handler.lock = threading.RLock()
        handler.close()


def test_stdio_probe_finds_a_stdout_nobody_reads() -> None:
    code = (
        "import os, sys\n"
        "r, w = os.pipe(); os.set_blocking(w, False)\n"
        "try:\n"
        "    while True: os.write(w, b'x' * 65536)\n"
        "except BlockingIOError: pass\n"
        "os.dup2(w, 1)\n"
        "from zygote import validators\n"
        "try:\n"
        "    validators.stdio()\n"
        "except RuntimeError as exc:\n"
        "    sys.stderr.write(str(exc))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "stdout (fd 1) would block" in proc.stderr


def test_resolver_and_openssl_probes_pass_here() -> None:
    validators.resolver()
    validators.openssl()
    assert "openssl" in validators.builtin()  # this process has OpenSSL loaded


def test_openssl_probe_not_offered_without_openssl() -> None:
    code = "from zygote import validators; print(sorted(validators.builtin()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    ).stdout
    assert out.strip() == "['logging', 'resolver', 'stdio']"
