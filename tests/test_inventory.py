"""Thread inventory, the fork gate and the built-in probes, in this process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

import zygote
from zygote import hooks
from zygote.child import gate, inventory, validators


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


def test_report_has_one_entry_per_kind_of_thread() -> None:
    """Request threads of a server are new for each request: one entry, one
    warning. A thread that stops stays listed, as not running."""
    report = inventory.Report()

    def request_thread(n: int) -> inventory.ThreadInfo:
        return inventory.ThreadInfo(
            "python",
            f"Thread-{n} (process_request_thread)",
            1000 + n,
            target="socketserver:ThreadingMixIn.process_request_thread",
            started_at="socketserver (/usr/lib/python3/socketserver.py:697)",
        )

    blas = inventory.ThreadInfo("native", "python", 7, origin="numpy")
    new, changed = report.update([request_thread(1), blas])
    assert len(new) == 2 and changed
    new, changed = report.update([request_thread(2), request_thread(3), blas])
    assert new == [] and changed  # two of the same kind run now
    running = {e["kind"]: e["running"] for e in report.entries()}
    assert running == {"python": 2, "native": 1}
    new, changed = report.update([request_thread(4), request_thread(5), blas])
    assert new == [] and not changed
    new, changed = report.update([])
    assert new == [] and changed
    assert [e["running"] for e in report.entries()] == [0, 0]


def test_inventory_names_where_a_thread_was_started() -> None:
    inventory.record_thread_starts()
    try:
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait, name="started-here", daemon=True)
        thread.start()
        line = sys._getframe().f_lineno - 1
        try:
            info = next(t for t in inventory.take() if t.name == "started-here")
        finally:
            stop.set()
            thread.join(5)
    finally:
        inventory.stop_recording()
    assert info.started_at == f"tests.test_inventory ({__file__}:{line})"
    assert info.target == "threading:Event.wait"
    assert "started by tests.test_inventory (" in info.describe()


def test_an_inventory_survives_threads_that_end_while_it_looks() -> None:
    """A thread that ends between listing /proc/self/task and reading its
    comm raises ProcessLookupError there (it killed the zygote once)."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            short = threading.Thread(target=int)
            short.start()
            short.join()

    # Measured before the fix: the error came within 700-1,400 inventories.
    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        for _ in range(10_000):
            inventory.take()
    finally:
        stop.set()
        churner.join(5)


def test_prevent_fork_outside_a_zygote_is_a_no_op() -> None:
    assert not gate.GATE.active
    with zygote.prevent_fork():
        pass


def test_gate_is_reentrant_and_a_fork_waits_for_visitors_to_leave() -> None:
    fork_gate = gate.ForkGate()
    inside, leave = threading.Event(), threading.Event()

    def visitor() -> None:
        with fork_gate.passing("outer"), fork_gate.passing("inner"):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=visitor, name="visitor")
    thread.start()
    inside.wait(10)
    assert not fork_gate.close(0.05)  # it is inside: the close times out
    assert fork_gate.visitors() == ["'visitor' in outer"]
    fork_gate.open()
    leave.set()
    assert fork_gate.close(5)  # it leaves (both levels): the gate closes
    fork_gate.open()
    thread.join(5)


def test_a_closing_gate_holds_new_visitors_back() -> None:
    fork_gate = gate.ForkGate()
    assert fork_gate.close(0)
    entered = threading.Event()

    def visitor() -> None:
        with fork_gate.passing("late"):
            entered.set()

    thread = threading.Thread(target=visitor)
    thread.start()
    assert not entered.wait(0.2)  # the fork holds the gate: it waits
    fork_gate.open()
    assert entered.wait(5)
    thread.join(5)


def test_gated_functions_behave_as_before() -> None:
    """In a fresh interpreter, as in a zygote: the gate first, then imports."""
    code = (
        "from zygote.child import gate\n"
        "gate.install()\n"
        "import hashlib, hmac, socket, ssl\n"
        "from hashlib import sha256\n"
        "assert sha256.__wrapped__ and ssl.SSLSocket.do_handshake.__wrapped__\n"
        "h = hmac.new(b'key', b'msg', hashlib.sha256)\n"
        "assert type(h._hmac).__name__ == 'HMAC', 'the OpenSSL fast path is kept'\n"
        "assert h.hexdigest() == hmac.digest(b'key', b'msg', sha256).hex()\n"
        "assert sha256(b'x').hexdigest() == hashlib.new('sha256', b'x').hexdigest()\n"
        "assert len(hashlib.pbkdf2_hmac('sha256', b'p', b's', 2)) == 32\n"
        "assert ssl.create_default_context().verify_mode == ssl.CERT_REQUIRED\n"
        "assert socket.getaddrinfo('localhost', 80)\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def test_logging_probe_finds_a_held_handler_lock() -> None:
    import logging

    handler = logging.Handler()
    try:
        held = threading.Thread(target=handler.lock.acquire)
        held.start()
        held.join()  # the lock stays held by a thread that no longer runs
        with pytest.raises(RuntimeError, match="is held"):
            validators.logging_handlers()
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
        "from zygote.child import validators\n"
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
    code = "from zygote.child import validators; print(sorted(validators.builtin()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    ).stdout
    assert out.strip() == "['logging', 'resolver', 'stdio']"
