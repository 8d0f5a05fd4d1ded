"""Preload for benchmarks: one idle thread, so the zygote counts as threaded
and children run the built-in probes."""

import threading
import time

threading.Thread(target=lambda: time.sleep(10**9), name="idle", daemon=True).start()
