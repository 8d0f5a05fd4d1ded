"""Where the CPU goes per job, by process and thread (issue 14, point 1).

    python -m benchmarks.cpu [-n 500] [--rounds 3] [--no-map] [--json]

One client loops `spawn("benchmarks.jobs:noop").result()` n times against a
`zygote start` server (numpy + pandas + benchmarks.jobs preloaded, like the
suite), in three setups: pooled (default --prefork), on demand (--prefork
0), and on demand with --no-cgroups; in the pooled setup also one
`map("benchmarks.jobs:echo", range(n))`. The three servers run at once and
their batches are interleaved with the floor's, the order rotated every
round (the load of a shared machine drifts). Around each batch it reads the
CPU time (user + system) and the context switches of every role:

* client: this process, split into its main thread and ZeroMQ's threads;
* supervisor: its main thread, its ZeroMQ I/O thread(s) (comm "ZMQbg/IO/*")
  and its other threads (ZeroMQ's reaper, the memory reader), plus its
  reaped children (cutime/cstime: orphaned workers, if any);
* zygote: its own time (it forks); workers: the zygote's cutime/cstime —
  a worker's time lands there when the zygote reaps it (pooled: the
  workers forked ahead and not yet reaped at either end of a batch shift
  by one or two jobs out of n);
* the cgroup watchdog and the helper process, if any.

Context switches come from /proc/PID/task/*/status (threads alive at both
ends); a dead worker's are not visible from outside, so workers have none.
The floor, in the same run: a helper with the same imports, gc.freeze()d,
forks n children one after the other, each `os._exit(0)` at once, and
reports getrusage(SELF) + getrusage(CHILDREN) around the loop.

Threads' CPU comes from /proc/PID/task/*/schedstat (nanoseconds; threads
alive at both ends of a batch). The workers' comes from cutime/cstime, in
clock ticks (CLK_TCK, 10 ms here): good to about one tick / n per job.
Medians of `rounds` batches, ms per job.
This process never forks (the server and the floor helper are started with
subprocess, like the other benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import PRELOAD, REPO, machine, preload_versions, zygote_server

TICK = os.sysconf("SC_CLK_TCK")
SETUPS = {
    "pooled": (),
    "on_demand": ("--prefork", "0"),
    "no_cgroups": ("--prefork", "0", "--no-cgroups"),
}
ROWS = ("client", "client_zmq", "supervisor_main", "supervisor_zmq_io", "supervisor_other",
        "supervisor_children", "zygote", "workers", "watchdog", "helper")  # fmt: skip
Sample = dict[str, tuple[float, int, int]]  # role -> (cpu seconds, voluntary, involuntary)


def _stat(pid: int | str, tid: int | str | None = None) -> list[int]:
    """utime, stime, cutime, cstime (ticks) of a process (or one thread)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    text = Path(path).read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return [int(field) for field in fields[11:15]]


def _runtime(pid: int | str, tid: int | str) -> float:
    """A thread's time on a CPU, seconds (schedstat: nanoseconds, not ticks)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9


def _switches(pid: int | str, tid: int | str) -> tuple[int, int]:
    voluntary = involuntary = 0
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches"):
            voluntary = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches"):
            involuntary = int(line.split()[1])
    return voluntary, involuntary


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _process(pid: int, name: str, split: bool) -> Sample:
    """Roles of one process: `name` (main thread if split, else all of it),
    `name`_zmq_io / `name`_other when split, `name`_children (cutime)."""
    _, _, cutime, cstime = _stat(pid)
    threads: dict[str, list[float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            runtime = _runtime(pid, task.name)
            vol, invol = _switches(pid, task.name)
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread ending under us
        kind = (
            "main"
            if task.name == str(pid)
            else "zmq_io"
            if comm.startswith("ZMQbg/IO")
            else "other"
        )
        if not split:
            kind = "main"
        acc = threads.setdefault(kind, [0.0, 0, 0])
        acc[0] += runtime
        acc[1] += vol
        acc[2] += invol
    out: Sample = {}
    main = threads.get("main", [0.0, 0, 0])
    if split:
        zmq = threads.get("zmq_io", [0.0, 0, 0])
        other = threads.get("other", [0.0, 0, 0])
        out[f"{name}_main"] = (main[0], int(main[1]), int(main[2]))
        out[f"{name}_zmq_io"] = (zmq[0], int(zmq[1]), int(zmq[2]))
        out[f"{name}_other"] = (other[0], int(other[1]), int(other[2]))
    else:
        out[name] = (main[0], int(main[1]), int(main[2]))
    out[f"{name}_children"] = ((cutime + cstime) / TICK, 0, 0)
    return out


def _add(a: tuple[float, int, int], b: tuple[float, int, int]) -> tuple[float, int, int]:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def snapshot(supervisor: int) -> Sample:
    me = _process(os.getpid(), "client", split=True)
    sample: Sample = {
        "client": me["client_main"],
        "client_zmq": _add(me["client_zmq_io"], me["client_other"]),
    }
    sup = _process(supervisor, "supervisor", split=True)
    sample.update(sup)
    for child in _children(supervisor):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        role = (
            "watchdog" if b"watchdog" in cmdline else "helper" if b"helper" in cmdline else "zygote"
        )
        got = _process(child, role, split=False)
        if role == "zygote":
            got["workers"] = got.pop("zygote_children")
        for key, value in got.items():
            if not key.endswith("_children"):
                sample[key] = _add(sample.get(key, (0.0, 0, 0)), value)
    return sample


def _delta(before: Sample, after: Sample, n: int) -> dict[str, dict[str, float]]:
    """ms of CPU and context switches per job, by role."""
    out: dict[str, dict[str, float]] = {}
    for role in ROWS:
        b, a = before.get(role, (0.0, 0, 0)), after.get(role, (0.0, 0, 0))
        out[role] = {
            "cpu_ms": (a[0] - b[0]) * 1000 / n,
            "vcsw": (a[1] - b[1]) / n,
            "ivcsw": (a[2] - b[2]) / n,
        }
    out["total"] = {
        key: sum(out[role][key] for role in ROWS) for key in ("cpu_ms", "vcsw", "ivcsw")
    }
    return out


def _supervisor_pid(endpoint: str) -> int:
    for pid in _children(os.getpid()):
        if endpoint.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise RuntimeError(f"no supervisor for {endpoint}")


def _batch(client: Any, supervisor: int, mode: str, n: int) -> dict[str, dict[str, float]]:
    before = snapshot(supervisor)
    if mode == "spawn":
        for _ in range(n):
            client.spawn("benchmarks.jobs:noop").result()
    else:
        assert list(client.map("benchmarks.jobs:echo", range(n))) == list(range(n))
    time.sleep(0.3)  # let the last worker be reaped
    return _delta(before, snapshot(supervisor), n)


def measure(n: int, rounds: int, with_map: bool) -> dict[str, Any]:
    """All setups' servers up at once, their batches (and the floor's)
    interleaved, the order rotated every round: the machine's load drifts
    across a run, and a setup measured last would carry the drift."""
    from zygote import Zygote

    batches: dict[str, list[Any]] = {"floor_cpu_ms": []}
    with contextlib.ExitStack() as stack:
        order: list[tuple[str, Any, int, str]] = []
        for name, setup in SETUPS.items():
            endpoint = stack.enter_context(zygote_server(*setup))
            client = stack.enter_context(Zygote(endpoint, timeout=60))
            for _ in range(20):
                client.spawn("benchmarks.jobs:noop").result()
            for mode in ["spawn"] + (["map"] if with_map and name == "pooled" else []):
                label = name if mode == "spawn" else f"{name}_{mode}"
                order.append((label, client, _supervisor_pid(endpoint), mode))
                batches[label] = []
        order.append(("floor_cpu_ms", None, 0, "floor"))
        time.sleep(0.5)
        for _ in range(rounds):
            for label, client, supervisor, mode in order:
                if mode == "floor":
                    batches[label].append(floor(n))
                else:
                    batches[label].append(_batch(client, supervisor, mode, n))
            order.append(order.pop(0))
    return {
        label: statistics.median(got) if label == "floor_cpu_ms" else _median(got)
        for label, got in batches.items()
    }


def _median(batches: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        role: {key: statistics.median(b[role][key] for b in batches) for key in batches[0][role]}
        for role in batches[0]
    }


def floor_helper(n: int) -> None:
    """In a process of its own: n fork/_exit cycles, CPU of parent + children."""
    for module in PRELOAD:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()
    for _ in range(20):
        if (pid := os.fork()) == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    def cpu() -> float:
        own, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start = cpu()
    for _ in range(n):
        if (pid := os.fork()) == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    print(json.dumps({"cpu_ms": (cpu() - start) * 1000 / n}))


def floor(n: int) -> float:
    command = [sys.executable, "-m", "benchmarks.cpu", "--floor-helper", str(n)]
    return float(json.loads(subprocess.check_output(command, cwd=REPO))["cpu_ms"])


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="jobs per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-map", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the JSON, not the table")
    parser.add_argument("--floor-helper", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_helper:
        floor_helper(args.floor_helper)
        return
    started = time.time()
    load_before = os.getloadavg()
    results = measure(args.n, args.rounds, with_map=not args.no_map)
    report = {
        "n": args.n,
        "rounds": args.rounds,
        "clk_tck": TICK,
        "resolution_ms_per_job": 1000 / TICK / args.n,
        "commit": _commit(),
        "machine": machine(),
        "preload": preload_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
    }
    out = REPO / "benchmarks" / "results" / "cpu.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(table(report))


def table(report: dict[str, Any]) -> str:
    results = report["results"]
    columns = [c for c in ("pooled", "on_demand", "no_cgroups", "pooled_map") if c in results]
    floor_ms = results["floor_cpu_ms"]
    lines = [
        "| ms of CPU per job | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for role in (*ROWS, "total"):
        cells = [f"{results[c][role]['cpu_ms']:.2f}" for c in columns]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    lines.append(
        "| ratio to floor | "
        + " | ".join(f"{results[c]['total']['cpu_ms'] / floor_ms:.1f}×" for c in columns)
        + " |"
    )
    lines.append(f"\nfloor (fork + _exit, parent + child): {floor_ms:.2f} ms per cycle\n")
    lines.append("| context switches per job (vol/invol) | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for role in (*ROWS, "total"):
        cells = [
            f"{results[c][role]['vcsw']:.1f} / {results[c][role]['ivcsw']:.1f}" for c in columns
        ]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nload average {report['loadavg_before']} -> {report['loadavg_after']};"
        f" {report['seconds']} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
