"""What the fork guards cost a spawn, side by side with them switched off.

    python -m benchmarks.guard_cost [-n 300] [--pause 0.010] [--before DIR]

Servers with numpy + pandas preloaded, forking on demand (--prefork 0: the
fork is on the request's path), measured in one run with spawns interleaved
round-robin (the order rotated every round, the same pause after each):
guards on / off in a thread-free zygote (where they are skipped by design)
and in a zygote with one idle thread (where every fork takes them and every
child gets fresh streams). With --before DIR (a checkout of the commit
before the guards), its thread-free server runs in the same rounds.

Every configuration runs on two servers, A and B: how far two identical
servers differ is the noise the differences must be read against.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

from zygote import Zygote

from .common import (
    PRELOAD,
    REPO,
    interleaved,
    machine,
    preload_versions,
    summary,
    zygote_server,
)

THREADED = (*PRELOAD, "benchmarks.idle_thread")
VARIANTS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "thread-free, guards on": ([], PRELOAD),
    "thread-free, guards off": (["--no-fork-guards"], PRELOAD),
    "idle thread, guards on": ([], THREADED),
    "idle thread, guards off": (["--no-fork-guards"], THREADED),
}
BEFORE = "thread-free, before the guards"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--pause", type=float, default=0.010)
    parser.add_argument("--before", type=Path, help="a checkout from before the guards")
    args = parser.parse_args()
    servers = {name: (options, preload, REPO) for name, (options, preload) in VARIANTS.items()}
    if args.before is not None:
        servers[BEFORE] = ([], PRELOAD, args.before.resolve())
    with contextlib.ExitStack() as stack:
        clients = {}
        # The A servers start in order, the B servers in reverse order: a
        # server started first or last is not always the same configuration.
        starts = [(name, "A") for name in servers] + [(name, "B") for name in reversed(servers)]
        for name, copy in starts:
            options, preload, tree = servers[name]
            endpoint = stack.enter_context(
                zygote_server(
                    "--max-workers", "2", "--prefork", "0", *options, preload=preload, tree=tree
                )
            )
            clients[f"{name} ({copy})"] = stack.enter_context(Zygote(endpoint, timeout=60))
        samples = interleaved(clients, args.n, args.pause)
    rows = {name: summary(values) for name, values in samples.items()}
    print(f"# {machine()}; {preload_versions()}; n={args.n}, pause {args.pause * 1000:g} ms")
    print(json.dumps(rows, indent=2))
    print(f"{'spawn -> result, on demand':38} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in sorted(rows.items()):
        print(f"{name:38} {row['p50']:8.2f} {row['p99']:8.2f}")
    for name in servers:
        a, b = rows[f"{name} (A)"]["p50"], rows[f"{name} (B)"]["p50"]
        print(f"{name}: p50 {(a + b) / 2:.2f} ms (A and B {abs(a - b):.2f} ms apart)")
    print(gated_call_cost())


# Run in a fresh interpreter: installing the gate wraps hashlib for good.
_GATED_CALL = """
import hashlib, timeit
raw = hashlib.sha256
from zygote.child import gate
gate.install()
gated = hashlib.sha256
def best(f):
    return min(timeit.repeat(lambda: f(b""), number=200_000, repeat=5)) / 200_000 * 1e9
unwrapped = best(raw)
gate.GATE.active = True
zygote = best(gated)
gate.GATE.active = False
worker = best(gated)
print(f"hashlib.sha256(b''): {unwrapped:.0f} ns unwrapped, {zygote:.0f} ns gated in a "
      f"zygote's thread, {worker:.0f} ns gated in a worker")
"""


def gated_call_cost() -> str:
    """What a gated call costs: unwrapped, in the zygote, in a worker."""
    out = subprocess.run(
        [sys.executable, "-c", _GATED_CALL], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


if __name__ == "__main__":
    main()
