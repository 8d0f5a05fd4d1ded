"""Preload: make the zygote's fork() misbehave as $ZYGOTE_TEST_FORK_FAULT says.

fail-once    the first fork() raises EAGAIN, as when out of processes;
exit-second  the zygote dies (os._exit) on its second fork request;
die-after    the first zygote dies right after its first fork, before it can
             tell anyone about the child, once the child is inside its first
             validator (with tests.flaky_validator; once, marked in
             $ZYGOTE_TEST_DIR).
"""

import errno
import os
import time
from pathlib import Path

_real_fork = os.fork
_calls = 0
FAULT = os.environ.get("ZYGOTE_TEST_FORK_FAULT", "")


def _fork() -> int:
    global _calls
    _calls += 1
    if FAULT == "fail-once" and _calls == 1:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable (injected)")
    if FAULT == "exit-second" and _calls == 2:
        os._exit(17)
    if FAULT == "die-after":
        mark = Path(os.environ["ZYGOTE_TEST_DIR"], "died-after-fork")
        if not mark.exists():
            mark.touch()
            pid = _real_fork()
            if pid:
                entered = Path(os.environ["ZYGOTE_TEST_DIR"], "flaky-validator-ran")
                deadline = time.monotonic() + 10
                while not entered.exists() and time.monotonic() < deadline:
                    time.sleep(0.001)
                os._exit(18)  # the zygote, before arming or reporting the child
            return pid
    return _real_fork()


os.fork = _fork
