"""Memory of 8 workers that each ran gc.collect() over a large preloaded heap, all alive at once.

    python -m benchmarks.memory [--heap-mb 200] [--json] [--plot DIR]

The heap is benchmarks/heap.py: about --heap-mb MB of small dicts holding a
str, an int, a float and a list, built at import. Every worker runs
`benchmarks.heap:collect_and_wait`: gc.collect(), then it creates
`collected-<pid>` in a directory this process watches, then it blocks until a
"go" file exists. Once all 8 have signalled, every worker's and its parent's
USS and PSS are read (psutil, /proc/PID/smaps_rollup); then "go" lets them
finish. The workers are made four ways:

* zygote: a server with --preload benchmarks.heap --prefork 0 (the zygote
  imports the heap, then gc.collect() and gc.freeze(), then forks per spawn);
* multiprocessing "fork" from a parent that imported the heap, then ran
  gc.collect() and gc.freeze(), as the zygote does;
* the same without gc.freeze(): the workers' gc.collect() then traverses the
  inherited heap and writes to every tracked object's GC header, copying
  the page it sits on;
* multiprocessing "spawn": each worker imports the heap itself.

The multiprocessing parents are helper processes (`--child METHOD`), so that
this process never forks and never holds the heap. Total PSS is the parent
(zygote or helper) plus the 8 workers; the supervisor and multiprocessing's
resource tracker are left out. MB are 2**20 bytes. Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from .common import REPO, machine, zygote_server

WORKERS = 8
TARGET_USS_MB = 3.0
HEAP_ENV = "ZYGOTE_BENCH_HEAP_MB"  # read by benchmarks/heap.py
TASK = "benchmarks.heap:collect_and_wait"
READY_TIMEOUT = 300.0  # the spawn variant builds 8 heaps on a small machine
MB = 1 << 20

VARIANTS: dict[str, str] = {
    "zygote": "zygote (preload, gc.freeze)",
    "fork": "multiprocessing fork, parent gc.freeze()",
    "fork-nofreeze": "multiprocessing fork, no gc.freeze()",
    "spawn": "multiprocessing spawn (own heap each)",
}

SHORT: dict[str, str] = {
    "zygote": "zygote",
    "fork": "mp fork\n+ gc.freeze()",
    "fork-nofreeze": "mp fork\nno gc.freeze()",
    "spawn": "mp spawn",
}


def wait_collected(
    ready_dir: Path, n: int, alive: Callable[[], bool], timeout: float = READY_TIMEOUT
) -> list[int]:
    """The pids of the `n` workers that have created collected-<pid>, i.e. whose
    gc.collect() has returned."""
    deadline = time.monotonic() + timeout
    while True:
        pids = sorted(int(p.name.split("-", 1)[1]) for p in ready_dir.glob("collected-*"))
        if len(pids) >= n:
            return pids
        if not alive():
            raise RuntimeError("the workers' parent exited before they all collected")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(pids)} of {n} workers collected in {timeout:g} s")
        time.sleep(0.01)


def measure(parent: int, workers: list[int]) -> dict[str, Any]:
    """USS/PSS/RSS in MB of the parent and of each worker, read back to back."""
    infos = [psutil.Process(pid).memory_full_info() for pid in [parent, *workers]]
    uss = [m.uss / MB for m in infos[1:]]
    pss = [m.pss / MB for m in infos[1:]]
    return {
        "parent_uss_mb": infos[0].uss / MB,
        "parent_pss_mb": infos[0].pss / MB,
        "parent_rss_mb": infos[0].rss / MB,
        "worker_uss_mb": uss,
        "worker_pss_mb": pss,
        "worker_rss_mb": [m.rss / MB for m in infos[1:]],
        "uss_median_mb": statistics.median(uss),
        "uss_max_mb": max(uss),
        "pss_median_mb": statistics.median(pss),
        "total_pss_mb": sum(m.pss for m in infos) / MB,
    }


def run_zygote(heap_mb: int, n: int) -> dict[str, Any]:
    """Workers spawned through a zygote server that preloads the heap."""
    from zygote import Zygote

    options = ("--max-workers", str(n), "--prefork", "0")
    with (
        tempfile.TemporaryDirectory(prefix="zyb-mem-") as tmp,
        zygote_server(
            *options, preload=("benchmarks.heap",), env={HEAP_ENV: str(heap_mb)}
        ) as endpoint,
        Zygote(endpoint, timeout=60) as client,
    ):
        go, ready = Path(tmp, "go"), Path(tmp, "ready")
        ready.mkdir()
        zygote_pid = int(client.stats()["zygote_pid"])
        handles = []
        try:
            for _ in range(n):
                handles.append(client.spawn(TASK, str(go), str(ready)))
            pids = wait_collected(ready, n, lambda: psutil.pid_exists(zygote_pid))
            if sorted(h.pid for h in handles) != pids:
                raise RuntimeError(f"collected {pids}, spawned {[h.pid for h in handles]}")
            figures = measure(zygote_pid, pids)
        finally:
            go.touch()
        for handle in handles:
            if handle.result() != handle.pid:
                raise RuntimeError(f"worker {handle.pid} returned another pid")
    return figures


def run_multiprocessing(method: str, heap_mb: int, n: int) -> dict[str, Any]:
    """Workers started by multiprocessing in a helper process (`--child method`)."""
    with tempfile.TemporaryDirectory(prefix="zyb-mem-") as tmp:
        go, ready = Path(tmp, "go"), Path(tmp, "ready")
        ready.mkdir()
        command = [sys.executable, "-m", "benchmarks.memory", "--child", method]
        command += ["--workers", str(n), "--go", str(go), "--ready-dir", str(ready)]
        env = {**os.environ, HEAP_ENV: str(heap_mb)}
        helper = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE)
        workers: list[int] = []
        try:
            assert helper.stdout is not None
            started = json.loads(helper.stdout.readline() or "null")
            if started is None:
                raise RuntimeError(f"--child {method} exited with {helper.wait()}")
            workers = sorted(started["workers"])
            pids = wait_collected(ready, n, lambda: helper.poll() is None)
            if pids != workers:
                raise RuntimeError(f"collected {pids}, started {workers}")
            figures = measure(helper.pid, pids)
            figures["heap"] = started["heap"]
        finally:
            go.touch()
            try:
                code = helper.wait(60)
            except subprocess.TimeoutExpired:
                for pid in [helper.pid, *workers]:
                    with contextlib.suppress(psutil.Error):
                        psutil.Process(pid).kill()
                code = helper.wait()
            if helper.stdout is not None:
                helper.stdout.close()
        if code != 0:
            raise RuntimeError(f"--child {method} exited with {code}")
    return figures


def _spawned_task(go: str, ready_dir: str) -> None:
    """The task of a "spawn" worker: the import builds this worker's own heap."""
    from . import heap

    heap.collect_and_wait(go, ready_dir)


def child(method: str, n: int, go: str, ready_dir: str) -> None:
    """The helper: start `n` multiprocessing workers, print their pids as a JSON
    line, wait for them. Exits non-zero if any worker failed."""
    target: Callable[[str, str], object]
    context: multiprocessing.context.SpawnContext | multiprocessing.context.ForkContext
    if method == "spawn":
        context = multiprocessing.get_context("spawn")
        target, heap_info = _spawned_task, None
    else:  # the parent holds the heap, like a zygote
        from . import heap

        gc.collect()
        if method == "fork":
            gc.freeze()
        context = multiprocessing.get_context("fork")
        target, heap_info = heap.collect_and_wait, heap.info()
    processes = [context.Process(target=target, args=(go, ready_dir)) for _ in range(n)]
    for process in processes:
        process.start()
    print(json.dumps({"workers": [p.pid for p in processes], "heap": heap_info}), flush=True)
    for process in processes:
        process.join()
    if any(process.exitcode != 0 for process in processes):
        sys.exit(1)


def run(heap_mb: int = 200, workers: int = WORKERS) -> dict[str, Any]:
    """All four variants, one after the other."""
    variants: dict[str, dict[str, Any]] = {"zygote": run_zygote(heap_mb, workers)}
    for method in ("fork", "fork-nofreeze", "spawn"):
        variants[method] = run_multiprocessing(method, heap_mb, workers)
    heap = variants["fork"].pop("heap")
    for figures in variants.values():
        figures.pop("heap", None)
    zygote = variants["zygote"]
    return {
        "heap_mb": heap_mb,
        "heap": heap,
        "workers": workers,
        "machine": machine(),
        "variants": {key: {"label": VARIANTS[key], **value} for key, value in variants.items()},
        "target_uss_mb": TARGET_USS_MB,
        "target_met": zygote["uss_max_mb"] <= TARGET_USS_MB,
    }


def target_line(results: dict[str, Any]) -> str:
    zygote = results["variants"]["zygote"]
    target, worst = results["target_uss_mb"], zygote["uss_max_mb"]
    verdict = (
        f"met, {target - worst:.2f} MB to spare"
        if worst <= target
        else f"missed by {worst - target:.2f} MB"
    )
    line = (
        f"Target: per-worker USS after gc.collect() with the {results['heap_mb']} MB heap "
        f"≤ {target:g} MB — {verdict} (zygote workers: max {worst:.2f} MB, "
        f"median {zygote['uss_median_mb']:.2f} MB)."
    )
    if results["heap_mb"] != 200:
        line += " The target is stated for the 200 MB heap."
    return line


def markdown(results: dict[str, Any]) -> str:
    """A ### section: what and how, a table, the target line."""
    n, heap = results["workers"], results["heap"]
    lines = [
        f"### c. Memory of {n} workers after gc.collect() over a {results['heap_mb']} MB heap",
        "",
        f"Each of {n} workers runs gc.collect() over a preloaded heap of "
        f"{heap['items']:,} small dict records ({heap['bytes'] / MB:.0f} MB, of which "
        f"{heap['gc_tracked_bytes'] / MB:.0f} MB are dict and list objects with GC headers), "
        "signals by creating a file, and blocks; with all "
        f"{n} alive, psutil reads the USS and PSS of every worker and of its parent "
        "(MB = 2^20 bytes; the multiprocessing parents are helper processes).",
        "",
        "| workers made by | USS median (MB) | USS max (MB) | PSS median (MB) "
        f"| parent PSS (MB) | total PSS, parent + {n} (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["variants"].values():
        lines.append(
            f"| {row['label']} | {row['uss_median_mb']:.2f} | {row['uss_max_mb']:.2f} "
            f"| {row['pss_median_mb']:.2f} | {row['parent_pss_mb']:.1f} "
            f"| {row['total_pss_mb']:.1f} |"
        )
    fork, nofreeze = results["variants"]["fork"], results["variants"]["fork-nofreeze"]
    lines += [
        "",
        "Without gc.freeze() in the parent, a worker's gc.collect() writes to the GC header of "
        "every tracked object it inherited, so every page holding one is copied: "
        f"{nofreeze['uss_median_mb']:.1f} MB per worker here, against "
        f"{fork['uss_median_mb']:.1f} MB with gc.freeze() (the 60-byte strs share pymalloc's "
        "64-byte pools with the dicts and lists, so their pages are copied too).",
        "",
        target_line(results),
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Per-worker USS (log scale, each worker a dot) and total PSS, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    keys = list(results["variants"])
    rows = [results["variants"][key] for key in keys]
    labels = [SHORT[key] for key in keys]
    x = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    medians = [row["uss_median_mb"] for row in rows]
    left.bar(x, medians, color="tab:blue", alpha=0.6, label="median")
    for i, row in enumerate(rows):
        left.scatter([i] * len(row["worker_uss_mb"]), row["worker_uss_mb"], s=10, color="k")
        left.annotate(f"{medians[i]:.1f}", (i, medians[i]), ha="center", va="bottom")
    left.axhline(results["target_uss_mb"], color="tab:red", linestyle="--", label="target")
    left.set_yscale("log")
    top = max(max(row["worker_uss_mb"]) for row in rows)
    left.set_ylim(0.5, max(top, results["target_uss_mb"]) * 2)
    left.yaxis.set_major_formatter(ScalarFormatter())
    left.set_ylabel("USS per worker (MB, log scale; dots: workers)")
    left.set_title(f"per-worker USS after gc.collect(), {results['heap_mb']} MB heap")
    left.legend(loc="upper left")
    parent = [row["parent_pss_mb"] for row in rows]
    workers = [row["total_pss_mb"] - row["parent_pss_mb"] for row in rows]
    right.bar(x, parent, color="tab:gray", label="parent")
    right.bar(x, workers, bottom=parent, color="tab:blue", label=f"{results['workers']} workers")
    for i, row in enumerate(rows):
        right.annotate(
            f"{row['total_pss_mb']:.0f}", (i, row["total_pss_mb"]), ha="center", va="bottom"
        )
    right.set_ylabel("PSS (MB)")
    right.set_title(f"total PSS, parent + {results['workers']} workers")
    right.legend(loc="upper left")
    for axes in (left, right):
        axes.set_xticks(x, labels)
    fig.tight_layout()
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heap-mb", type=int, default=200)
    parser.add_argument("--workers", type=int, default=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="also write DIR/memory.png")
    parser.add_argument(
        "--child", choices=("fork", "fork-nofreeze", "spawn"), help=argparse.SUPPRESS
    )
    parser.add_argument("--go", help=argparse.SUPPRESS)
    parser.add_argument("--ready-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child(args.child, args.workers, args.go, args.ready_dir)
        return
    results = run(args.heap_mb, args.workers)
    if args.plot:
        plot(results, args.plot)
    print(json.dumps(results, indent=2) if args.json else markdown(results))


if __name__ == "__main__":
    main()
