"""The supervisor's memory stays flat while large results pass through it."""

from __future__ import annotations

from collections.abc import Callable

import psutil
import pytest

from .conftest import Server

SIZE = 15 << 20  # 15 MiB, as tests.big_results:blob returns
JOBS = 30
WARMUP = 2
MAX_GROWTH = 150 * 1000 * 1000  # 150 MB


@pytest.mark.timeout(60)
def test_large_results_one_at_a_time_keep_supervisor_rss_flat(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(
        "--max-workers",
        "2",
        "--max-message-bytes",
        str(64 << 20),
        "--max-results-bytes",
        str(1 << 30),
        preload=("tests.big_results",),
    )
    client = server.client(timeout=30)
    supervisor = psutil.Process(server.pid)

    def run(i: int) -> None:
        handle = client.spawn("tests.big_results:blob", i)
        value = handle.result()
        assert len(value) == SIZE and value[:1] == bytes([i % 256])
        del value
        handle.wait()

    for i in range(WARMUP):
        run(i)
    baseline = supervisor.memory_info().rss
    peak = baseline
    for i in range(WARMUP, WARMUP + JOBS):
        run(i)
        peak = max(peak, supervisor.memory_info().rss)
    final = supervisor.memory_info().rss

    # On the peak, not only the final reading: memory that waits for the cyclic
    # garbage collector comes back whenever it happens to run, so the final
    # reading alone passes or fails by luck.
    mb = 1e6
    print(
        f"supervisor RSS: baseline {baseline / mb:.0f} MB, peak {peak / mb:.0f} MB, "
        f"final {final / mb:.0f} MB"
    )
    assert peak - baseline < MAX_GROWTH, (
        f"supervisor RSS grew {(peak - baseline) / mb:.0f} MB over {JOBS} results of "
        f"{SIZE >> 20} MiB (limit {MAX_GROWTH / mb:.0f} MB): baseline {baseline / mb:.0f} MB, "
        f"peak {peak / mb:.0f} MB, final {final / mb:.0f} MB"
    )
