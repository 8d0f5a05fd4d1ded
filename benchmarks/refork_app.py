"""Preload for benchmarks/refork.py: a task whose first use in a process is
expensive, the way a real application's is, and cheap in a warm process.

The first use imports matplotlib.pyplot (not in the preload; about 0.5 s on
the benchmark machine) and renders one small chart, which loads a font and
fills matplotlib's caches. A long-lived process would have paid this once;
a worker forked from a cold zygote pays it every time; a worker forked from
a promoted (reforked) zygote finds it done.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import time


@functools.cache
def _chart_backend() -> int:
    """Import the plotting stack and render once; the size of the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2, 2), dpi=50)
    axes.plot([0, 1, 2], [0, 1, 4])
    axes.set_title("warm-up")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return len(buffer.getvalue())


def lazy_first_use() -> dict[str, object]:
    """Use the plotting stack: was it already loaded, and what did its first
    use cost this process (milliseconds; ~0 when inherited warm)."""
    was_loaded = "matplotlib.pyplot" in sys.modules and _chart_backend.cache_info().currsize > 0
    start = time.perf_counter()
    _chart_backend()
    return {
        "was_loaded": was_loaded,
        "lazy_ms": (time.perf_counter() - start) * 1000,
        "pid": os.getpid(),
    }


def hold(ready_dir: str, release: str, timeout: float = 120.0) -> dict[str, object]:
    """`lazy_first_use()`, then say so (a file named after our pid in
    `ready_dir`) and stay alive until `release` exists: a worker whose
    memory can be read."""
    outcome = lazy_first_use()
    with open(os.path.join(ready_dir, str(os.getpid())), "w"):
        pass
    deadline = time.monotonic() + timeout
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return outcome
