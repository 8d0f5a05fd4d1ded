"""Spawn latency through the client against the raw fork floor, like for like.

    python -m benchmarks.spawn_latency [-n 300] [--pause 0.010]

With numpy + pandas imported both in a helper process (for the floor) and in
the zygote, measures in one run, interleaved, each followed by the same pause:

* floor: os.fork() -> the child's first instruction, from the helper (this
  process never forks: see benchmarks/floor.py);
* spawn -> handle: `Zygote.spawn()` returning (the worker is ready);
* spawn -> result: `spawn(...).result()` of a no-op task.

The zygote runs with --prefork 0 (every spawn forks). The tight-loop floor
(no pause) is printed for information. Needs the `bench` extra:
pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import time

from zygote import Zygote

from .common import machine, preload_versions, summary, zygote_server
from .floor import FloorProbe


def measure(endpoint: str, n: int, pause: float) -> dict[str, list[float]]:
    """Floor and spawn samples interleaved, one of each per round, so that
    drift on a shared machine hits both alike."""
    samples: dict[str, list[float]] = {"floor": [], "handle": [], "result": []}
    with Zygote(endpoint, timeout=60) as client, FloorProbe() as floor:
        for _ in range(20):  # warm-up: connection, first forks
            client.spawn("benchmarks.jobs:noop").result()
            floor.sample()
        for _ in range(n):
            samples["floor"].append(floor.sample())
            time.sleep(pause)
            start = time.perf_counter()
            handle = client.spawn("benchmarks.jobs:noop")
            ready = time.perf_counter()
            handle.result()
            done = time.perf_counter()
            samples["handle"].append(ready - start)
            samples["result"].append(done - start)
            time.sleep(pause)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--pause", type=float, default=0.010)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    with zygote_server("--max-workers", "4", "--prefork", "0") as endpoint:
        samples = measure(endpoint, args.n, args.pause)
    with FloorProbe() as floor:
        floor_tight = [floor.sample() for _ in range(args.n)]
    rows = {
        "fork floor, paused": summary(samples["floor"]),
        "fork floor, tight loop": summary(floor_tight),
        "spawn -> handle": summary(samples["handle"]),
        "spawn -> result": summary(samples["result"]),
    }
    ratio = rows["spawn -> result"]["p50"] / rows["fork floor, paused"]["p50"]
    if args.json:
        print(json.dumps({"rows": rows, "ratio": ratio, "pause": args.pause}, indent=2))
        return
    print(f"# {machine()}; {preload_versions()}; n={args.n}, pause {args.pause * 1000:g} ms")
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, row in rows.items():
        print(f"{name:28} {row['p50']:8.2f} {row['p99']:8.2f} {row['mean']:8.2f}")
    print(f"spawn->result p50 / paused floor p50 = {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
