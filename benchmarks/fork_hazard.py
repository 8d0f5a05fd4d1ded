"""How often children of a zygote with threads hang, with and without the
fork guards, against plain multiprocessing fork, in one run.

    python -m benchmarks.fork_hazard service [-n 1000] [--baseline-n 200]
    python -m benchmarks.fork_hazard tls [-n 2000] [--baseline-n 500]
    python -m benchmarks.fork_hazard openssl [-n 2000] [--variants]

`service`: the zygote preloads examples.service_threads (two threads logging
at a high rate to a RotatingFileHandler, two making TLS requests to a local
TLS server started here); each job logs and makes one TLS request; with the
guards on and off, with those loops moved to the helper process
(`@zygote.background`) or deferred to each worker (`--thread-policy defer`),
and without them (the thread-free p50 to compare with). `tls`: the same
without the logging threads. `openssl`: examples.openssl_threads
(threads looping on SSL contexts and PBKDF2), the validators' own benchmark.

A job that hangs in its task ends as a task timeout; a child that hangs
before it is ready is caught by the validators' deadline and replaced (the
client never sees it). Both are counted. The bad configurations take ~3 s
per hung job, so they run `--baseline-n` jobs.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import warnings
from multiprocessing.connection import Connection, wait

from examples import tls_server
from zygote import TaskTimeout, Zygote, ZygoteError

from .common import REPO, machine, percentile, zygote_server

VALIDATORS_OFF = [
    arg
    for name in ("openssl", "logging", "stdio", "resolver")
    for arg in ("--disable-validator", name)
]
IN_FLIGHT = 4


def run_zygote(
    n: int, options: list[str], preload: str, task: str, env: dict[str, str], timeout: float
) -> dict:
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    handles: list[float] = []  # spawn -> handle: the worker is ready
    with (
        zygote_server(
            "--max-workers",
            str(IN_FLIGHT),
            "--validate-timeout",
            "1",
            "--corrupt-limit",
            "1000",
            *options,
            preload=(preload,),
            env=env,
        ) as endpoint,
        Zygote(endpoint, timeout=120) as client,
    ):
        window: collections.deque = collections.deque()

        def collect() -> None:
            started, handle = window.popleft()
            try:
                handle.result()
                latencies.append(time.monotonic() - started)
                outcomes["ok"] += 1
            except TaskTimeout:
                outcomes["hung in the task"] += 1
            except ZygoteError as exc:
                outcomes[f"error: {type(exc).__name__}"] += 1

        for i in range(n):
            started = time.monotonic()
            try:
                window.append((started, client.spawn(task, i, _timeout=timeout)))
                handles.append(time.monotonic() - started)
            except ZygoteError as exc:
                outcomes[f"spawn error: {type(exc).__name__}"] += 1
            if len(window) >= IN_FLIGHT:
                collect()
        while window:
            collect()
        stats = client.stats()
    return {
        "jobs": n,
        "ok": outcomes.pop("ok", 0),
        "hung": outcomes.pop("hung in the task", 0),
        "caught at start-up": stats["failed_starts"],
        "by step": stats["validator_failures"],
        "guard waits": stats["fork_guard_waits"],
        "guard wait ms (mean)": round(
            stats["fork_guard_wait_seconds"] * 1000 / max(1, stats["fork_guard_waits"]), 2
        ),
        "guard timeouts": stats["fork_guard_timeouts"],
        "threads in the zygote": sum(t["running"] for t in stats["threads"]),
        "other": dict(outcomes),
        "p50 ms": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
        "handle p50 ms": round(percentile(handles, 50) * 1000, 2) if handles else None,
    }


def run_multiprocessing(n: int, env: dict[str, str], task: str, timeout: float) -> dict:
    """The same jobs, one `multiprocessing` fork each, from a process that
    imported the same preload (so it has the same threads)."""
    command = [sys.executable, "-m", "benchmarks.fork_hazard", "_mp", task, str(n), str(timeout)]
    out = subprocess.run(
        command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _mp_job(module: str, name: str, job: int, conn: Connection) -> None:
    import importlib

    conn.send(getattr(importlib.import_module(module), name)(job))


def _mp_main(task: str, n: int, timeout: float) -> None:
    import importlib

    module, name = task.split(":")
    importlib.import_module(module)  # its threads start here, as in a zygote
    context = multiprocessing.get_context("fork")
    warnings.simplefilter("ignore", DeprecationWarning)  # "fork with threads"
    running: dict[Connection, tuple[multiprocessing.process.BaseProcess, float]] = {}
    result = {"jobs": n, "ok": 0, "hung": 0, "caught at start-up": 0}
    latencies: list[float] = []
    submitted = 0
    while submitted < n or running:
        while submitted < n and len(running) < IN_FLIGHT:
            ours, theirs = context.Pipe(duplex=False)
            process = context.Process(target=_mp_job, args=(module, name, submitted, theirs))
            started = time.monotonic()
            process.start()
            theirs.close()
            running[ours] = (process, started)
            submitted += 1
        for conn in wait(list(running), timeout=0.05):
            process, started = running.pop(conn)  # type: ignore[call-overload]
            try:
                conn.recv()
                result["ok"] += 1
                latencies.append(time.monotonic() - started)
            except EOFError:
                result.setdefault("died", 0)
                result["died"] += 1  # type: ignore[operator]
            process.join()
            conn.close()
        now = time.monotonic()
        for conn, (process, started) in list(running.items()):
            if now - started > timeout:
                process.kill()
                process.join()
                del running[conn]
                conn.close()
                result["hung"] += 1
    result["p50 ms"] = round(percentile(latencies, 50) * 1000, 2) if latencies else None  # type: ignore[assignment]
    print(json.dumps(result))


def main() -> None:
    if sys.argv[1:2] == ["_mp"]:
        _mp_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["service", "tls", "openssl"])
    parser.add_argument("-n", type=int, default=None, help="jobs with the guards on")
    parser.add_argument("--baseline-n", type=int, default=None, help="jobs in the other runs")
    parser.add_argument("--task-timeout", type=float, default=3.0)
    parser.add_argument("--variants", action="store_true", help="openssl: each probe half alone")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="service/tls: only these configurations"
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="service/tls: seconds the threads rest between log lines or requests",
    )
    args = parser.parse_args()
    if args.scenario == "openssl":
        report = openssl_scenario(args.n or 2000, args.task_timeout, args.variants)
    else:
        report = service_scenario(args)
    print(f"# {machine()}; scenario {args.scenario}")
    print(json.dumps(report, indent=2))


def service_scenario(args: argparse.Namespace) -> dict:
    tls_only = args.scenario == "tls"
    n = args.n or (2000 if tls_only else 1000)
    baseline_n = args.baseline_n or (500 if tls_only else 200)
    task = "examples.service_threads:handle_job"
    report = {}
    with tls_server.running(REPO) as address, tempfile.TemporaryDirectory() as logs:
        env = {
            "SERVICE_TLS": address,
            "SERVICE_LOG": f"{logs}/service.log",
            "SERVICE_PAUSE": str(args.pause),
        }
        if tls_only:
            env["SERVICE_LOG_THREADS"] = "0"
        configurations: dict[str, tuple[int, list[str], dict[str, str]]] = {
            "zygote, guards on": (n, [], {}),
            "zygote, guards on, validators off": (n, VALIDATORS_OFF, {}),
            "zygote, guards off": (baseline_n, ["--no-fork-guards"], {}),
            # The same loops moved out of the zygote, and a zygote without them.
            "zygote, threads in the helper": (n, [], {"SERVICE_THREADS_IN": "helper"}),
            "zygote, threads deferred to workers": (n, ["--thread-policy", "defer"], {}),
            "zygote, no such threads": (
                n,
                [],
                {"SERVICE_LOG_THREADS": "0", "SERVICE_TLS_THREADS": "0"},
            ),
        }
        if args.only:
            configurations = {k: v for k, v in configurations.items() if k in args.only}
        for name, (jobs, options, extra) in configurations.items():
            report[name] = run_zygote(
                jobs,
                options,
                "examples.service_threads",
                task,
                {**env, **extra},
                args.task_timeout,
            )
            print(name, report[name], file=sys.stderr, flush=True)
        if not args.only or "multiprocessing fork" in args.only:
            report["multiprocessing fork"] = run_multiprocessing(
                baseline_n, env, task, args.task_timeout
            )
    return report


def openssl_scenario(n: int, task_timeout: float, variants: bool) -> dict:
    off = ["--no-fork-guards", *VALIDATORS_OFF]
    configurations = {
        "guards on": [],
        "guards off, validators on": ["--no-fork-guards"],
        "guards off, validators off": off,
        # The openssl probe's two halves on their own, as custom validators.
        "guards off, only RAND + digest fetch": [
            *off,
            "--validator",
            "benchmarks.probes:rand_and_fetch",
        ],
        "guards off, only SSLContext": [*off, "--validator", "benchmarks.probes:context"],
    }
    if not variants:
        configurations = dict(list(configurations.items())[:3])
    task = "examples.openssl_threads:digest"
    return {
        name: run_zygote(n, options, "examples.openssl_threads", task, {}, task_timeout)
        for name, options in configurations.items()
    }


if __name__ == "__main__":
    main()
