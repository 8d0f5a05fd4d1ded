"""What capturing a worker's stdout and stderr costs a spawn: this tree
against a checkout from before the capture, side by side.

    git archive <commit before> | tar -x -C /tmp/zygote-before
    python -m benchmarks.output_cost --before /tmp/zygote-before [-n 300] [--pause 0.010]

Servers with numpy + pandas preloaded, with the ready pool (--prefork 2, the
default) and forking on demand (--prefork 0), measured in one run with
spawns of a no-op task interleaved round-robin (the order rotated every
round, the same pause after each). Every configuration runs on two servers,
A and B: how far two identical servers differ is the noise the difference
must be read against.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from zygote import Zygote

from .common import REPO, interleaved, machine, preload_versions, summary, zygote_server

MODES = {"pool": ["--prefork", "2"], "on demand": ["--prefork", "0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--pause", type=float, default=0.010)
    parser.add_argument("--before", type=Path, required=True, help="a checkout from before")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": REPO}
    servers = [(mode, when) for mode in MODES for when in trees]
    with contextlib.ExitStack() as stack:
        clients = {}
        # A servers start in order, B servers in reverse order.
        starts = [(s, "A") for s in servers] + [(s, "B") for s in reversed(servers)]
        for (mode, when), copy in starts:
            options = ["--max-workers", "2", *MODES[mode]]
            endpoint = stack.enter_context(zygote_server(*options, tree=trees[when]))
            clients[f"{mode}, {when} ({copy})"] = stack.enter_context(Zygote(endpoint, timeout=60))
        samples = interleaved(clients, args.n, args.pause)
    rows = {name: summary(values) for name, values in samples.items()}
    print(f"# {machine()}; {preload_versions()}; n={args.n}, pause {args.pause * 1000:g} ms")
    print(json.dumps(rows, indent=2))
    print(f"{'spawn -> result':28} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in sorted(rows.items()):
        print(f"{name:28} {row['p50']:8.2f} {row['p99']:8.2f}")
    for mode, when in servers:
        a, b = rows[f"{mode}, {when} (A)"]["p50"], rows[f"{mode}, {when} (B)"]["p50"]
        print(f"{mode}, {when}: p50 {(a + b) / 2:.2f} ms (A and B {abs(a - b):.2f} ms apart)")


if __name__ == "__main__":
    main()
