"""Preload: background functions in the helper process. A heartbeat that
writes its pid and a beat count, and a collector that appends whatever
workers send to a file, one line per message ($ZYGOTE_TEST_DIR)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import zygote

DIR = Path(os.environ.get("ZYGOTE_TEST_DIR", "/tmp"))


@zygote.background
def heartbeat() -> None:
    beats = 0
    while True:
        beats += 1
        (DIR / "heartbeat.tmp").write_text(json.dumps({"pid": os.getpid(), "beats": beats}))
        os.replace(DIR / "heartbeat.tmp", DIR / "heartbeat")
        time.sleep(0.05)


@zygote.background
def collector(inbox) -> None:
    with open(DIR / "collected", "a", buffering=1) as out:
        for item in inbox:
            out.write(json.dumps(item) + "\n")


def report(worker: int, count: int) -> int:
    """A task: send `count` numbered messages to the collector."""
    for n in range(count):
        collector.send({"worker": worker, "n": n, "pid": os.getpid()})
    return os.getpid()


if os.environ.get("ZYGOTE_TEST_STUCK_COLLECTOR"):

    @zygote.background
    def stuck(inbox) -> None:
        time.sleep(3600)  # never reads: its inbox fills up


def report_stuck(count: int) -> int:
    """A task: send `count` messages to a function that never reads them;
    how many send() accepted."""
    return sum(stuck.send(n) for n in range(count))


def send_garbage() -> int:
    """A worker that writes what send() never would: [[1], 2], not msgpack."""
    import msgpack

    from zygote.child.outbox import OUTBOX

    assert OUTBOX.fd is not None
    for data in (msgpack.packb([[1], 2]), b"\xc1 not msgpack", msgpack.packb(3)):
        os.write(OUTBOX.fd, data)
    return os.getpid()


def send_after(path: str) -> list[bool]:
    """Wait for `path` to exist (the test reloads meanwhile), then send."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [collector.send({"late": n}) for n in range(3)]
