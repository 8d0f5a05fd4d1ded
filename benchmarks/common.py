"""Shared pieces of the benchmarks: a server to measure, the raw fork floor, statistics."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PRELOAD = ("numpy", "pandas", "benchmarks.jobs")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    """p50/p99/mean in milliseconds of values in seconds."""
    return {
        "p50": percentile(values, 50) * 1000,
        "p99": percentile(values, 99) * 1000,
        "mean": statistics.fmean(values) * 1000,
        "n": len(values),
    }


@contextlib.contextmanager
def zygote_server(
    *options: str,
    preload: tuple[str, ...] = PRELOAD,
    env: dict[str, str] | None = None,
    tree: Path = REPO,
) -> Iterator[str]:
    """A `zygote start` process for the duration of the block; yields its
    endpoint. `tree`: the checkout whose zygote runs (another commit's, to
    compare)."""
    from zygote import Zygote
    from zygote.errors import ZygoteError

    sockdir = tempfile.mkdtemp(prefix="zyb-", dir="/tmp")
    endpoint = f"ipc://{sockdir}/bench.sock"
    command = [
        sys.executable,
        "-m",
        "zygote",
        "start",
        "--endpoint",
        endpoint,
        "--log-level",
        "WARNING",
        *options,
    ]
    for module in preload:
        command += ["--preload", module]
    log = open(Path(sockdir) / "server.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        command, cwd=tree, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(Path(sockdir, "server.log").read_text())
            with contextlib.suppress(ZygoteError), Zygote(endpoint, timeout=2) as client:
                if client.stats()["zygote_state"] == "ready":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        yield endpoint
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def interleaved(clients: dict[str, Any], n: int, pause: float) -> dict[str, list[float]]:
    """Spawn->result of a no-op task on each client in turn, n rounds, the
    order rotated every round and `pause` seconds after every sample (after
    20 warm-up spawns each). Seconds per sample, by client name."""
    for client in clients.values():
        for _ in range(20):
            client.spawn("benchmarks.jobs:noop").result()
    samples: dict[str, list[float]] = {name: [] for name in clients}
    order = list(clients.items())
    for _ in range(n):
        order.append(order.pop(0))  # rotate: no server always goes first
        for name, client in order:
            start = time.perf_counter()
            client.spawn("benchmarks.jobs:noop").result()
            samples[name].append(time.perf_counter() - start)
            time.sleep(pause)
    return samples


def machine() -> str:
    """One line describing where the figures come from."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} vCPU ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def preload_versions() -> str:
    import numpy
    import pandas

    return f"numpy {numpy.__version__}, pandas {pandas.__version__}"
