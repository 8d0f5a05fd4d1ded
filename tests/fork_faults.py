"""Preload: make the zygote's fork() misbehave as $ZYGOTE_TEST_FORK_FAULT says.

fail-once    the first fork() raises EAGAIN, as when out of processes;
exit-second  the zygote dies (os._exit) on its second fork request.
"""

import errno
import os

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
    return _real_fork()


os.fork = _fork
