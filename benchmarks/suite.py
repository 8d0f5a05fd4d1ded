"""The benchmark suite: every figure in docs/benchmarks.md's suite section.

    python -m benchmarks.suite            # about 6 minutes here
    python -m benchmarks.suite --quick    # a smoke run, seconds; writes nothing

Runs a. latency, b. throughput, c. memory, d. scaling, one after the other
(each part interleaves its own comparisons, so every ratio compares figures
from the same minutes), then writes benchmarks/results/suite.json, the plots
in docs/img/, and the part of docs/benchmarks.md between the suite markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from typing import Any

from . import latency, memory, scaling, throughput
from .common import REPO, machine, preload_versions

DOC = REPO / "docs" / "benchmarks.md"
IMAGES = REPO / "docs" / "img"
RESULTS = REPO / "benchmarks" / "results" / "suite.json"
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


def run(quick: bool) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    started = time.monotonic()
    timings = {}
    for name, call in (
        ("latency", lambda: latency.run(n=20, slow_n=3) if quick else latency.run()),
        ("throughput", lambda: throughput.run(duration=2.0 if quick else 20.0)),
        ("memory", lambda: memory.run(heap_mb=30 if quick else 200)),
        ("scaling", lambda: scaling.run(n=5 if quick else 60)),
    ):
        part_started = time.monotonic()
        print(f"suite: {name} ...", flush=True)
        parts[name] = call()
        timings[name] = time.monotonic() - part_started
    parts["meta"] = {
        "machine": machine(),
        "preload": preload_versions(),
        "date": datetime.date.today().isoformat(),
        "seconds": time.monotonic() - started,
        "part_seconds": timings,
    }
    return parts


def section(parts: dict[str, Any]) -> str:
    meta = parts["meta"]
    part_times = ", ".join(f"{k} {v:.0f} s" for k, v in meta["part_seconds"].items())
    lines = [
        BEGIN,
        "## The suite",
        "",
        "```sh",
        ".venv/bin/pip install -e '.[bench]'",
        ".venv/bin/python -m benchmarks.suite",
        "```",
        "",
        f"Last run {meta['date']} on {meta['machine']}; {meta['preload']}. "
        f"It took {meta['seconds'] / 60:.1f} minutes ({part_times}). Raw figures: "
        "[benchmarks/results/suite.json](../benchmarks/results/suite.json). Generated: edit "
        "`benchmarks/*.py`, not this section.",
        "",
        latency.markdown(parts["latency"]),
        "",
        "![latency](img/latency.png)",
        "",
        throughput.markdown(parts["throughput"]),
        "",
        "![throughput](img/throughput.png)",
        "",
        memory.markdown(parts["memory"]),
        "",
        "![memory](img/memory.png)",
        "",
        scaling.markdown(parts["scaling"]),
        "",
        "![scaling](img/scaling.png)",
        END,
    ]
    return "\n".join(lines)


def write(parts: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(parts, indent=2, sort_keys=True) + "\n")
    IMAGES.mkdir(parents=True, exist_ok=True)
    for module, key in (
        (latency, "latency"),
        (throughput, "throughput"),
        (memory, "memory"),
        (scaling, "scaling"),
    ):
        module.plot(parts[key], IMAGES)
    text = DOC.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} section to replace")
    DOC.write_text(text[:start] + section(parts) + text[end + len(END) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; writes nothing")
    args = parser.parse_args()
    parts = run(args.quick)
    if args.quick:
        print(section(parts))
    else:
        write(parts)
        print(
            f"suite: wrote {DOC}, {RESULTS} and {IMAGES}/*.png in "
            f"{parts['meta']['seconds'] / 60:.1f} minutes"
        )


if __name__ == "__main__":
    main()
