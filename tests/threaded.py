"""Preload: a Python thread that stays in the zygote, and one vouched for."""

import threading
import time

import zygote


def _flush_metrics() -> None:
    while True:
        time.sleep(0.05)


def _heartbeat() -> None:
    while True:
        time.sleep(0.05)


threading.Thread(target=_flush_metrics, name="metrics-flusher", daemon=True).start()
_safe = threading.Thread(target=_heartbeat, name="vouched-heartbeat", daemon=True)
_safe.start()
zygote.mark_fork_safe(_safe)
