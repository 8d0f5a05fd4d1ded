"""What the built-in validators cost, side by side with them switched off.

    python -m benchmarks.validator_cost [-n 300] [--pause 0.010]

Four servers, all with numpy + pandas preloaded, measured in one run with
spawns interleaved round-robin (one to each per round, the order rotated
every round, the same pause after each): built-in validators on / off, in a
thread-free zygote (where they are skipped by design) and in a zygote with
one idle thread (where every child runs them). Prints spawn->result p50/p99
and the differences.
"""

from __future__ import annotations

import argparse
import contextlib
import json

from zygote import Zygote

from .common import PRELOAD, interleaved, machine, preload_versions, summary, zygote_server

OFF = [
    arg
    for name in ("openssl", "logging", "stdio", "resolver")
    for arg in ("--disable-validator", name)
]
VARIANTS = {
    "thread-free, validators on": ([], PRELOAD),
    "thread-free, validators off": (OFF, PRELOAD),
    "threaded, validators on": ([], (*PRELOAD, "benchmarks.idle_thread", "ssl")),
    "threaded, validators off": (OFF, (*PRELOAD, "benchmarks.idle_thread", "ssl")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--pause", type=float, default=0.010)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, (options, preload) in VARIANTS.items():
            endpoint = stack.enter_context(
                zygote_server("--max-workers", "2", *options, preload=preload)
            )
            clients[name] = stack.enter_context(Zygote(endpoint, timeout=60))
        samples = interleaved(clients, args.n, args.pause)
    rows = {name: summary(values) for name, values in samples.items()}
    costs = {
        "thread-free": rows["thread-free, validators on"]["p50"]
        - rows["thread-free, validators off"]["p50"],
        "threaded": rows["threaded, validators on"]["p50"]
        - rows["threaded, validators off"]["p50"],
    }
    if args.json:
        print(json.dumps({"rows": rows, "costs_ms": costs}, indent=2))
        return
    print(f"# {machine()}; {preload_versions()}; n={args.n}, pause {args.pause * 1000:g} ms")
    print(f"{'spawn -> result':32} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in rows.items():
        print(f"{name:32} {row['p50']:8.2f} {row['p99']:8.2f}")
    for kind, cost in costs.items():
        print(f"validators cost, {kind} zygote: {cost:+.2f} ms at p50 (target <= 0.3 ms)")


if __name__ == "__main__":
    main()
