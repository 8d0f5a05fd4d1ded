"""Preload: a thread takes a lock and never lets go; a validator needs it.
Every child of this zygote is corrupt."""

import threading
import time

import zygote

LOCK = threading.Lock()
_taken = threading.Event()


def _hog() -> None:
    with LOCK:
        _taken.set()
        while True:
            time.sleep(3600)


threading.Thread(target=_hog, name="lock-hog", daemon=True).start()
_taken.wait()


@zygote.validator(name="needs-lock")
def needs_lock() -> None:
    with LOCK:
        pass
