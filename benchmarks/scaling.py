"""Part d: how spawn latency scales with the zygote's heap and with the number
of live workers.

Heap: extra memory of 0, 230 and 950 MiB on top of numpy + pandas (about
70 MiB, so roughly 70 MB / 300 MB / 1 GB in all), as Python objects (an
ordinary heap), as a numpy array on transparent huge pages, and as the same
array in shared memory (`zygote.share`);
for each, on-demand spawn -> result against the fork floor of a helper
process holding the same memory, interleaved. Concurrency: spawn -> result
with 0 to 63 other workers alive.

    python -m benchmarks.scaling [-n 60]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from zygote import Zygote

from .common import PRELOAD, summary, zygote_server
from .floor import FloorProbe

HEAPS = (
    ("ordinary", 0),
    ("ordinary", 230),
    ("hugepages", 230),
    ("shared", 230),
    ("ordinary", 950),
    ("hugepages", 950),
    ("shared", 950),
)
CONCURRENCY = (0, 7, 15, 31, 63)
KINDS = {
    "ordinary": "of Python objects",
    "hugepages": "numpy array (huge pages)",
    "shared": "numpy array, zygote.share()",
}


def _memory_of(pid: int) -> tuple[float, float]:
    """Resident and huge-page MiB of a process, from /proc."""
    rss = huge = 0.0
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("AnonHugePages:"):
                huge = int(line.split()[1]) / 1024
    return rss, huge


def _heap_case(kind: str, mb: int, n: int, pause: float) -> dict[str, Any]:
    env = {"ZYGOTE_BENCH_HEAP_KIND": kind, "ZYGOTE_BENCH_HEAP_MB": str(mb)}
    preload = (*PRELOAD, "benchmarks.bigheap")
    floor_samples, spawn_samples = [], []
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(
            zygote_server("--max-workers", "4", "--prefork", "0", preload=preload, env=env)
        )
        client = stack.enter_context(Zygote(endpoint, timeout=120))
        floor = stack.enter_context(FloorProbe(preload, env))
        rss, huge = _memory_of(int(client.stats()["zygote_pid"]))
        for _ in range(5):
            floor.sample()
            client.spawn("benchmarks.jobs:noop").result()
        for _ in range(n):
            floor_samples.append(floor.sample())
            time.sleep(pause)
            start = time.perf_counter()
            client.spawn("benchmarks.jobs:noop").result()
            spawn_samples.append(time.perf_counter() - start)
            time.sleep(pause)
    return {
        "kind": kind,
        "extra_mb": mb,
        "zygote_rss_mb": rss,
        "huge_mb": huge,
        "floor": summary(floor_samples),
        "spawn": summary(spawn_samples),
    }


def _concurrency(n: int, pause: float) -> list[dict[str, Any]]:
    cases = []
    with (
        zygote_server("--max-workers", "70", "--prefork", "0") as endpoint,
        Zygote(endpoint, timeout=120) as client,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for alive in CONCURRENCY:
            go = Path(tmp, f"go-{alive}")
            holders = [client.spawn("benchmarks.jobs:wait_for", str(go)) for _ in range(alive)]
            samples = []
            for _ in range(n):
                start = time.perf_counter()
                client.spawn("benchmarks.jobs:noop").result()
                samples.append(time.perf_counter() - start)
                time.sleep(pause)
            go.touch()
            for handle in holders:
                handle.result()
            cases.append({"alive": alive, "spawn": summary(samples)})
    return cases


def run(n: int = 60, pause: float = 0.010) -> dict[str, Any]:
    return {
        "pause_ms": pause * 1000,
        "heaps": [_heap_case(kind, mb, n, pause) for kind, mb in HEAPS],
        "concurrency": _concurrency(n, pause),
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "### d. Scaling",
        "",
        "On-demand spawn → result (every spawn forks) against the raw fork floor of a helper "
        "process holding the same memory, interleaved, "
        f"{results['pause_ms']:g} ms pause; p50 in ms.",
        "",
        "| zygote memory | of it on huge pages | fork floor | spawn → result | spawn ÷ floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in results["heaps"]:
        what = (
            "numpy + pandas"
            if not case["extra_mb"]
            else (f"+ {case['extra_mb']} MiB {KINDS[case['kind']]}")
        )
        lines.append(
            f"| {what} ({case['zygote_rss_mb']:.0f} MiB resident) | {case['huge_mb']:.0f} MiB | "
            f"{case['floor']['p50']:.2f} | {case['spawn']['p50']:.2f} | "
            f"{case['spawn']['p50'] / case['floor']['p50']:.2f}× |"
        )
    lines += [
        "",
        "With other workers alive (each blocked in a task), a no-op spawn → result, p50 / p99 ms:",
        "",
        "| other workers alive | p50 | p99 |",
        "| --- | --- | --- |",
    ]
    for case in results["concurrency"]:
        lines.append(
            f"| {case['alive']} | {case['spawn']['p50']:.2f} | {case['spawn']['p99']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("ordinary", "o"), ("hugepages", "s"), ("shared", "^")):
        cases = [c for c in results["heaps"] if c["kind"] == kind or c["extra_mb"] == 0]
        cases.sort(key=lambda c: c["extra_mb"])
        base = cases[0]["zygote_rss_mb"]  # numpy + pandas alone
        sizes = [base + c["extra_mb"] for c in cases]
        left.plot(sizes, [c["spawn"]["p50"] for c in cases], marker=marker, label=f"{kind}: spawn")
        left.plot(
            sizes,
            [c["floor"]["p50"] for c in cases],
            marker=marker,
            linestyle=":",
            label=f"{kind}: fork floor",
        )
    left.set_xlabel("memory the zygote holds (MiB)")
    left.set_ylabel("p50 (ms)")
    left.set_title("Latency against heap size")
    left.legend(fontsize=7)
    cases = results["concurrency"]
    right.plot(
        [c["alive"] for c in cases], [c["spawn"]["p50"] for c in cases], marker="o", label="p50"
    )
    right.plot(
        [c["alive"] for c in cases], [c["spawn"]["p99"] for c in cases], marker="o", label="p99"
    )
    right.set_xlabel("other workers alive")
    right.set_ylabel("spawn → result (ms)")
    right.set_title("Latency against live workers")
    right.legend(fontsize=7)
    fig.tight_layout()
    path = outdir / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=60)
    parser.add_argument("--pause", type=float, default=0.010)
    args = parser.parse_args()
    print(markdown(run(args.n, args.pause)))


if __name__ == "__main__":
    main()
