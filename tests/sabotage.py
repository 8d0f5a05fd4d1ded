"""Preload: a logging handler whose lock is left held — what a fork leaves
behind when another thread was inside the handler — and, unless
$ZYGOTE_TEST_NO_THREAD is set, a thread in the zygote."""

import logging
import os
import threading
import time

handler = logging.Handler()
# Python's logging resets the locks of the handlers it knows about after a
# fork; this one opts out, like a handler guarding state with a lock of its own.
logging._at_fork_reinit_lock_weakset.discard(handler)
handler.lock = threading.Lock()
handler.lock.acquire()

if not os.environ.get("ZYGOTE_TEST_NO_THREAD"):
    threading.Thread(target=lambda: time.sleep(3600), name="idle", daemon=True).start()
