"""A preload with a large heap of ordinary Python objects, and the tasks that run against it.

At import, builds about $ZYGOTE_BENCH_HEAP_MB (default 200) MB of small records:
a list of dicts, each holding a str, an int, a float and a short list. Dicts
and lists carry GC headers, which is the worst case for copy-on-write: a full
collection in a forked child writes to the header of every tracked object,
and so copies the page it sits on, unless the parent moved the objects out of
the collector's reach with gc.freeze() before forking. (The list matters:
CPython stops tracking a dict or tuple that holds only atomic values, such as
strs and numbers, the first time the collector sees it; a record holding a
list stays tracked.)

Used by benchmarks/memory.py. Imports nothing of zygote's and no ZeroMQ."""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

ENV = "ZYGOTE_BENCH_HEAP_MB"
HEAP_MB = int(os.environ.get(ENV, "200"))


def _record(i: int) -> dict[str, object]:
    return {"id": i, "name": f"row-{i:07d}", "tags": [i % 7, i % 11], "score": i * 0.5}


def _footprint(record: dict[str, object]) -> tuple[int, int]:
    """Bytes one record takes (each allocation rounded to pymalloc's 16 bytes,
    plus its slot in the list), and how many of them are in allocations that
    carry a GC header (a dict's key table and a list's item array do not)."""
    parts = [record, *record.values()]
    size = sum(-(-sys.getsizeof(part) // 16) * 16 for part in parts) + 8
    headed = sum(
        -(-(type(part).__basicsize__ + 16) // 16) * 16 for part in parts if gc.is_tracked(part)
    )
    return size, headed


_PER_RECORD, _TRACKED_PER_RECORD = _footprint(_record(HEAP_MB << 20))
ITEMS = (HEAP_MB << 20) // _PER_RECORD
HEAP_BYTES = ITEMS * _PER_RECORD
GC_TRACKED_BYTES = ITEMS * _TRACKED_PER_RECORD
HEAP: list[dict[str, object]] = [_record(i) for i in range(ITEMS)]


def info() -> dict[str, int]:
    """The heap's size, for the benchmark's report."""
    return {
        "heap_mb": HEAP_MB,
        "items": ITEMS,
        "bytes": HEAP_BYTES,
        "gc_tracked_bytes": GC_TRACKED_BYTES,
    }


def collect_and_wait(go_path: str, ready_dir: str | None = None, timeout: float = 600.0) -> int:
    """Run gc.collect(); then, if `ready_dir` is given, create `collected-<pid>`
    in it; then block until `go_path` exists. Returns this process's pid."""
    gc.collect()
    pid = os.getpid()
    if ready_dir is not None:
        Path(ready_dir, f"collected-{pid}").touch()
    go = Path(go_path)
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go_path} did not appear within {timeout:g} s")
        time.sleep(0.01)
    return pid
