"""Issue 14's throughput target, as its own benchmark: `map()` from 2 client
processes and a spawn loop from 4, together, against the raw fork ceiling;
with `--before DIR`, the same load on another checkout (the code before a
change) in the same run, windows alternating round by round.

    python -m benchmarks.traffic [--before DIR] [--rounds 3] [--duration 10] [--json FILE]

Completed jobs per second (no-op spawns, `echo` maps) with numpy + pandas +
benchmarks.jobs preloaded, servers with --max-workers 8 (the ceiling's 8
children in flight). Each server's clients run that checkout's client code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path
from typing import Any

from .common import REPO, machine, preload_versions, zygote_server
from .throughput import TARGET, WORKERS, _helper, measure

MAPS, LOOPS = 2, 4


def run(before: Path | None, rounds: int, duration: float, warmup: float) -> dict[str, Any]:
    trees = {"this": REPO, **({"before": before} if before is not None else {})}
    figures: dict[str, list[float]] = {"ceiling": [], **{name: [] for name in trees}}
    with contextlib.ExitStack() as stack:
        endpoints = {
            name: stack.enter_context(
                zygote_server(
                    "--max-workers", str(WORKERS), tree=tree, env={"PYTHONPATH": str(tree)}
                )
            )
            for name, tree in trees.items()
        }
        for round_ in range(rounds):
            names = list(figures)
            names = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in names:
                if name == "ceiling":
                    figures[name].append(measure([_helper("fork")], duration, warmup))
                    continue
                tree, endpoint = trees[name], endpoints[name]
                commands = [_helper("zygote-map", endpoint, tree=tree)] * MAPS
                commands += [_helper("zygote", endpoint, tree=tree)] * LOOPS
                figures[name].append(measure(commands, duration, warmup, cwd=tree))
                print(f"round {round_ + 1}: {name} {figures[name][-1]:.0f}/s", flush=True)
    medians = {name: statistics.median(values) for name, values in figures.items()}
    return {
        "machine": machine(),
        "preload": preload_versions(),
        "rounds": rounds,
        "duration": duration,
        "before": str(before) if before else None,
        "jobs_per_second": figures,
        "medians": medians,
        "of_ceiling": {n: medians[n] / medians["ceiling"] for n in trees},
        "target": TARGET,
    }


def table(report: dict[str, Any]) -> str:
    medians, of_ceiling = report["medians"], report["of_ceiling"]
    lines = [
        "| | jobs/s (median) | per round | of the raw fork ceiling |",
        "| --- | ---: | --- | ---: |",
    ]
    for name, values in report["jobs_per_second"].items():
        share = "100%" if name == "ceiling" else f"{of_ceiling[name]:.0%}"
        rounds = ", ".join(f"{v:.0f}" for v in values)
        lines.append(f"| {name} | {medians[name]:.0f} | {rounds} | {share} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another checkout, measured alongside")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    before = args.before.resolve() if args.before else None
    report = run(before, args.rounds, args.duration, args.warmup)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
