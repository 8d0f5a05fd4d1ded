"""Part a: spawn -> result latency of a trivial task, every way a user has.

All in one run, interleaved round-robin, with the same preload (numpy +
pandas) everywhere and the same pause after every sample: the raw fork floor,
zygote forking on demand, zygote with its ready pool, multiprocessing's fork,
forkserver and spawn start methods, and a fresh `python` per job. The two
slow ones (hundreds of ms each) can be given fewer samples, spread over the
run (--slow-n); by default every method gets n.

    python -m benchmarks.latency [-n 300] [--slow-n 300] [--pause 0.010]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from zygote import Zygote

from .baselines import BaselineProbe
from .common import summary, zygote_server
from .floor import FloorProbe

FAST = ("fork floor", "zygote on demand", "zygote pool", "mp fork", "mp forkserver")
SLOW = ("mp spawn", "fresh python")


def run(n: int = 300, slow_n: int = 300, pause: float = 0.010) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in (*FAST, *SLOW)}
    handles: dict[str, list[float]] = {"zygote on demand": [], "zygote pool": []}
    every = max(1, n // slow_n)
    with contextlib.ExitStack() as stack:
        on_demand = stack.enter_context(zygote_server("--max-workers", "4", "--prefork", "0"))
        pooled = stack.enter_context(zygote_server("--max-workers", "4", "--prefork", "2"))
        clients = {
            "zygote on demand": stack.enter_context(Zygote(on_demand, timeout=60)),
            "zygote pool": stack.enter_context(Zygote(pooled, timeout=60)),
        }
        floor = stack.enter_context(FloorProbe())
        baselines = stack.enter_context(BaselineProbe())

        def one(name: str) -> None:
            if name == "fork floor":
                samples[name].append(floor.sample())
            elif name in clients:
                start = time.perf_counter()
                handle = clients[name].spawn("benchmarks.jobs:noop")
                ready = time.perf_counter()
                handle.result()
                samples[name].append(time.perf_counter() - start)
                handles[name].append(ready - start)
            else:
                samples[name].append(baselines.sample(name))
            time.sleep(pause)

        for _ in range(10):  # warm-up: connections, first forks, the forkserver
            for name in (*FAST, *SLOW):
                one(name)
        for values in (*samples.values(), *handles.values()):
            values.clear()
        for i in range(n):
            for name in FAST:
                one(name)
            if i % every == 0:
                for name in SLOW:
                    one(name)
    rows = {name: summary(values) for name, values in samples.items()}
    floor_p50 = rows["fork floor"]["p50"]
    for row in rows.values():
        row["x_floor"] = row["p50"] / floor_p50
    return {
        "pause_ms": pause * 1000,
        "rows": rows,
        "handles": {name: summary(values) for name, values in handles.items()},
    }


def _ratio(rows: dict[str, Any], slower: str, faster: str) -> float:
    return float(rows[slower]["p50"] / rows[faster]["p50"])


# The last two compare zygote as configured by default: with its ready pool.
TARGETS = [
    ("on-demand p50 <= 1.5x the floor", lambda r: r["zygote on demand"]["x_floor"] <= 1.5),
    ("pool p50 <= 0.3x the floor", lambda r: r["zygote pool"]["x_floor"] <= 0.3),
    (">= 3x faster than forkserver", lambda r: _ratio(r, "mp forkserver", "zygote pool") >= 3),
    (
        ">= 50x faster than a fresh interpreter",
        lambda r: _ratio(r, "fresh python", "zygote pool") >= 50,
    ),
]


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    lines = [
        "### a. Spawn → result latency",
        "",
        f"A trivial task, numpy + pandas preloaded everywhere, {results['pause_ms']:g} ms "
        "pause after every sample, all methods interleaved in one run. The floor is a raw "
        "`os.fork()` to the child's first instruction, from a helper process with the same "
        "imports.",
        "",
        "| method | n | p50 ms | p99 ms | p50 ÷ floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['n']} | {row['p50']:.2f} | {row['p99']:.2f} | {row['x_floor']:.2f}× |"
        )
    handles = results["handles"]
    lines += [
        "",
        "Spawn → handle (the worker is running the task): on demand "
        f"{handles['zygote on demand']['p50']:.2f} ms, from the pool "
        f"{handles['zygote pool']['p50']:.2f} ms (p50).",
        "",
        "| target | met? |",
        "| --- | --- |",
    ]
    for text, check in TARGETS:
        lines.append(f"| {text} | {'yes' if check(rows) else '**no**'} |")
    od, ms, fp = rows["zygote on demand"], rows["mp forkserver"], rows["fresh python"]
    lines += [
        "",
        f"zygote with its ready pool (the default) is "
        f"{_ratio(rows, 'mp forkserver', 'zygote pool'):.1f}× faster than multiprocessing "
        f"forkserver and {_ratio(rows, 'fresh python', 'zygote pool'):.0f}× faster than a fresh "
        f"interpreter; forking on demand, {ms['p50'] / od['p50']:.1f}× and "
        f"{fp['p50'] / od['p50']:.0f}×.",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, [rows[n]["p50"] for n in names], color="#4477aa")
    ax.set_xscale("log")
    ax.set_xlabel("spawn → result, p50 (ms, log scale)")
    ax.invert_yaxis()
    for i, name in enumerate(names):
        ax.text(rows[name]["p50"], i, f" {rows[name]['p50']:.2f}", va="center", fontsize=8)
    ax.set_title("Latency of a trivial task, numpy + pandas preloaded")
    fig.tight_layout()
    path = outdir / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--slow-n", type=int, default=300)
    parser.add_argument("--pause", type=float, default=0.010)
    args = parser.parse_args()
    print(markdown(run(args.n, args.slow_n, args.pause)))


if __name__ == "__main__":
    main()
