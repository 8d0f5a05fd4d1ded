"""Preload: threads that hold forks off on demand, to test prevent_fork()
and fork_lock(). A test creates `<dir>/open-section` (or `<dir>/hold-lock`);
the thread notes when it entered and left in files of that directory."""

import os
import threading
import time
from pathlib import Path

import zygote

DIR = Path(os.environ.get("ZYGOTE_TEST_DIR", "/tmp"))
HOLD = float(os.environ.get("ZYGOTE_TEST_HOLD", "1.0"))
LOCK = zygote.fork_lock(threading.Lock())


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.005)


def _section_holder() -> None:
    _wait_for(DIR / "open-section")
    with zygote.prevent_fork():
        (DIR / "section-opened").write_text(repr(time.monotonic()))
        time.sleep(HOLD)
        (DIR / "section-closed").write_text(repr(time.monotonic()))


def _lock_holder() -> None:
    _wait_for(DIR / "hold-lock")
    with LOCK:
        (DIR / "lock-taken").write_text(repr(time.monotonic()))
        time.sleep(HOLD)
        (DIR / "lock-released").write_text(repr(time.monotonic()))


threading.Thread(target=_section_holder, name="section-holder", daemon=True).start()
threading.Thread(target=_lock_holder, name="lock-holder", daemon=True).start()


def started_at() -> float:
    return time.monotonic()


def take_lock() -> bool:
    """In a worker: the fork lock came released, and prevent_fork() is harmless."""
    with zygote.prevent_fork():
        got = LOCK.acquire(timeout=5)
    if got:
        LOCK.release()
    return got
