"""Sustained throughput of no-op jobs: zygote against the raw fork ceiling and
multiprocessing.Pool, all with the same preload.

    python -m benchmarks.throughput [--duration 20] [--warmup 1] [--json] [--plot DIR]

Completed `benchmarks.jobs:noop` tasks per second over `duration` seconds, in
one run, numpy + pandas + benchmarks.jobs preloaded everywhere:

* zygote: a server with --max-workers 8 (default --prefork), driven by 1, 4
  and 16 client processes, each looping `spawn(...).result()` on one client;
* the raw fork ceiling: a helper with the same imports (gc.freeze()d, like
  benchmarks/floor.py) forking children that `os._exit(0)` at once, up to 8
  in flight, reaping them as they end;
* multiprocessing.Pool(8, maxtasksperchild=1) on a forkserver with the same
  preload, 64 `apply_async` tasks in flight.

Everything that is measured runs in helper processes started with
subprocess (fork+exec through vfork), so this process never forks (see
benchmarks/floor.py). The helpers start, warm up, report "ready", then all
get the same window on the system-wide monotonic clock: they keep working
from then on, but count only what completes between `warmup` seconds later
and the window's end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import PRELOAD, REPO, machine, preload_versions, zygote_server

TASK = "benchmarks.jobs:noop"
MAP_TASK = "benchmarks.jobs:echo"  # map() passes each item
WORKERS = 8  # zygote --max-workers, children in flight for the ceiling, Pool processes
CLIENTS = (1, 4, 16)
POOL_IN_FLIGHT = 64
TARGET = 0.8  # sustained throughput >= 80% of the raw fork ceiling

Window = Callable[[], tuple[float, float]]


# -- helpers: each runs in a process of its own ----------------------------


def _window() -> tuple[float, float]:
    """Report ready, then wait for the (start, end) of the measurement."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    start, end = (float(field) for field in sys.stdin.readline().split())
    return start, end


def _zygote_client(window: Window, endpoint: str) -> int:
    """Loop spawn().result() on one client; completions inside the window."""
    from zygote import Zygote

    count = 0
    with Zygote(endpoint, timeout=60) as client:
        client.spawn(TASK).result()  # connect before reporting ready
        start, end = window()
        while True:
            client.spawn(TASK).result()
            now = time.monotonic()
            if now >= end:
                break
            if now >= start:
                count += 1
    return count


def _zygote_map(window: Window, endpoint: str) -> int:
    """Loop `map()` over batches of 100 items on one client (its default
    window: the server's max-workers); completions inside the window."""
    from zygote import Zygote

    count = 0
    with Zygote(endpoint, timeout=60) as client:
        list(client.map(MAP_TASK, range(8)))  # connect, warm up
        start, end = window()
        while True:
            for _ in client.map(MAP_TASK, range(100)):
                now = time.monotonic()
                if start <= now < end:
                    count += 1
            if time.monotonic() >= end:
                break
    return count


def _fork_ceiling(window: Window) -> int:
    """Fork children that exit at once, WORKERS in flight; reaped inside the window."""
    for module in PRELOAD:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()
    start, end = window()
    count = running = 0
    while time.monotonic() < end:
        if running < WORKERS:
            if os.fork() == 0:
                os._exit(0)
            running += 1
            continue
        os.wait()
        running -= 1
        if start <= time.monotonic() < end:
            count += 1
    while running:
        os.wait()
        running -= 1
    return count


def _mp_pool(window: Window) -> int:
    """multiprocessing.Pool on a forkserver, POOL_IN_FLIGHT tasks in flight."""
    import multiprocessing
    import threading

    from .jobs import noop

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    slots = threading.Semaphore(POOL_IN_FLIGHT)
    start = end = float("inf")
    count = 0
    errors: list[BaseException] = []

    def done(_: object) -> None:  # in the pool's result thread, one at a time
        nonlocal count
        if start <= time.monotonic() < end:
            count += 1
        slots.release()

    def failed(exc: BaseException) -> None:
        errors.append(exc)
        slots.release()

    with context.Pool(processes=WORKERS, maxtasksperchild=1) as pool:
        for _ in range(2 * WORKERS):  # forkserver up, a few generations of workers
            pool.apply(noop)
        start, end = window()
        while time.monotonic() < end:
            slots.acquire()
            pool.apply_async(noop, callback=done, error_callback=failed)
    if errors:
        raise errors[0]
    return count


ROLES: dict[str, Callable[..., int]] = {
    "zygote": _zygote_client,
    "zygote-map": _zygote_map,
    "fork": _fork_ceiling,
    "pool": _mp_pool,
}


def helper_main() -> None:
    """Entry point of a helper process: argv is the role and its arguments."""
    role, *args = sys.argv[1:]
    count = ROLES[role](_window, *args)
    sys.stdout.write(f"{count}\n")
    sys.stdout.flush()


def _helper(role: str, *args: str, tree: Path = REPO) -> list[str]:
    """A helper's command line; `tree`: the checkout whose zygote client it
    uses (the helper code is always this one's)."""
    code = "from benchmarks.throughput import helper_main; helper_main()"
    if tree != REPO:  # its zygote package first, then ours for the rest
        code = (
            f"import sys; sys.path.insert(0, {str(tree)!r}); import zygote, zygote.client; "
            f"sys.path.insert(0, {str(REPO)!r}); {code}"
        )
    return [sys.executable, "-c", code, role, *args]


# -- the measuring side: starts helpers, never forks itself -----------------


def _clients(n: str) -> str:
    return f"{n} client{'' if n == '1' else 's'}"


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()


def _read(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"helper {process.args!r} died (exit {process.wait()})")
    return line.strip()


def measure(commands: list[list[str]], duration: float, warmup: float, cwd: Path = REPO) -> float:
    """Run the helpers together over one window; their completions per second.
    `cwd`: the checkout whose client code they run."""
    with contextlib.ExitStack() as stack:
        processes = []
        for command in commands:
            process = stack.enter_context(
                subprocess.Popen(
                    command, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            )
            stack.callback(_kill, process)  # runs first on the way out: a no-op if done
            processes.append(process)
        for process in processes:
            if _read(process) != "ready":
                raise RuntimeError(f"helper {process.args!r} did not start")
        start = time.monotonic() + warmup
        window = f"{start!r} {start + duration!r}\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(window)
            process.stdin.flush()
        counts = [int(_read(process)) for process in processes]
        for process in processes:
            process.wait(60)
    return sum(counts) / duration


def run(duration: float = 20.0, warmup: float = 1.0) -> dict[str, Any]:
    """All measurements, one after the other; JSON-serialisable figures (tasks/s)."""
    ceiling = measure([_helper("fork")], duration, warmup)
    zygote: dict[str, float] = {}
    with zygote_server("--max-workers", str(WORKERS)) as endpoint:
        for clients in CLIENTS:
            zygote[str(clients)] = measure(
                [_helper("zygote", endpoint)] * clients, duration, warmup
            )
    pool = measure([_helper("pool")], duration, warmup)
    best = max(zygote, key=lambda clients: zygote[clients])
    return {
        "duration": duration,
        "warmup": warmup,
        "machine": machine(),
        "preload": f"{', '.join(PRELOAD)} ({preload_versions()})",
        "zygote": zygote,
        "zygote_best_clients": best,
        "raw_fork_ceiling": ceiling,
        "mp_pool_forkserver": pool,
        "ratios": {
            "zygote_best_vs_raw_fork_ceiling": zygote[best] / ceiling,
            "zygote_best_vs_mp_pool_forkserver": zygote[best] / pool,
            "mp_pool_forkserver_vs_raw_fork_ceiling": pool / ceiling,
        },
        "target": {"vs_raw_fork_ceiling": TARGET, "met": zygote[best] >= TARGET * ceiling},
    }


def markdown(results: dict[str, Any]) -> str:
    """A markdown section: what was measured, a table, the target and the verdict."""
    ceiling = results["raw_fork_ceiling"]
    zygote = results["zygote"]
    best = results["zygote_best_clients"]
    ratios = results["ratios"]
    lines = [
        "### b. Throughput against the raw fork ceiling",
        "",
        f"Completed no-op tasks per second over {results['duration']:g} s (after "
        f"{results['warmup']:g} s of warm-up, not counted), with {results['preload']} "
        f"preloaded everywhere: a zygote server (`--max-workers {WORKERS}`, default "
        "`--prefork`) driven by 1, 4 and 16 client processes each looping "
        "`spawn(...).result()`; the raw fork ceiling, a helper process with the same "
        f"imports forking children that `os._exit(0)` at once, {WORKERS} in flight; and "
        f"`multiprocessing.Pool({WORKERS}, maxtasksperchild=1)` on a forkserver with the same "
        f"preload, {POOL_IN_FLIGHT} tasks in flight. {results['machine']}.",
        "",
        "| | tasks/s | of the raw fork ceiling |",
        "| --- | --- | --- |",
    ]
    rows = [(f"zygote, {_clients(clients)}", tps) for clients, tps in zygote.items()]
    rows += [
        (f"raw fork ceiling ({WORKERS} in flight)", ceiling),
        ("multiprocessing.Pool, forkserver", results["mp_pool_forkserver"]),
    ]
    for name, tps in rows:
        lines.append(f"| {name} | {tps:.0f} | {tps / ceiling:.0%} |")
    share = ratios["zygote_best_vs_raw_fork_ceiling"]
    margin = (share - TARGET) * 100
    verdict = (
        f"met, by {margin:.0f} percentage points"
        if results["target"]["met"]
        else f"missed, by {-margin:.0f} percentage points"
    )
    lines += [
        "",
        f"Target: sustained throughput >= {TARGET:.0%} of the raw fork ceiling. Zygote's best "
        f"({_clients(best)}, {zygote[best]:.0f} tasks/s) is "
        f"{share:.0%} of the ceiling: {verdict}. It is "
        f"{ratios['zygote_best_vs_mp_pool_forkserver']:.2f}x the multiprocessing.Pool.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], outdir: Path) -> list[Path]:
    """One bar chart, outdir/throughput.png, with the 80% target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceiling = results["raw_fork_ceiling"]
    labels = [f"zygote\n{_clients(clients)}" for clients in results["zygote"]]
    values = list(results["zygote"].values())
    colors = ["tab:blue"] * len(values)
    labels += ["raw fork\nceiling", "mp.Pool\nforkserver"]
    values += [ceiling, results["mp_pool_forkserver"]]
    colors += ["tab:gray", "tab:orange"]

    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "throughput.png"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=2)
    ax.axhline(
        TARGET * ceiling,
        color="tab:red",
        linestyle="--",
        label=f"target: {TARGET:.0%} of the raw fork ceiling",
    )
    ax.set_ylabel("completed no-op tasks/s")
    ax.set_title(f"Throughput, {results['duration']:g} s per measurement, same preload")
    ax.set_ylim(0, max(values) * 1.15)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not counted")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="also write DIR/throughput.png")
    args = parser.parse_args()
    results = run(args.duration, args.warmup)
    if args.plot is not None:
        plot(results, args.plot)
    print(json.dumps(results, indent=2) if args.json else markdown(results))


if __name__ == "__main__":
    main()
