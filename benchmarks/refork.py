"""What a refork buys and costs: first-task latency and workers' memory
before and after promoting a warm worker, and how long a new generation
takes to serve.

    python -m benchmarks.refork [-n 20] [--rounds 3] [--quick] [--json FILE]

Three servers, numpy + pandas + benchmarks.refork_app preloaded,
`--max-workers 8`, run side by side in one run: two that are reforked
(`--prefork 0` and `--prefork 2`) and a control that never is
(`--prefork 0`), sampled in the same rounds, so that the control shows how
much the machine itself drifted between "before" and "after".

1. First-task latency: spawn -> result of `refork_app:lazy_first_use`,
   whose first use in a process imports matplotlib.pyplot and renders a
   chart. n rounds (one spawn per server per round, the order rotated, each
   spawn made once the server has settled: no worker left, the pool full)
   on generation 1; then each reforked server is asked to refork, a
   candidate spawned while the request waits; then n rounds again. Each
   round also times a no-op spawn per server: the spawn's own cost, which
   a promoted zygote (bigger, its heap frozen) may change.
2. Trigger to serving: for a refork, from the candidate's result reaching
   the client to `refork()` returning (the candidate's hooks, gc.freeze,
   its probe child's fork and validators, the switch); for a reload, from
   `reload()` to stats() showing the new generation ready (a fresh
   interpreter importing the preload, then its probe child). After the
   latency rounds: `--rounds` alternating reloads and reforks on both
   reforked servers, plus their first refork.
3. Memory: 8 concurrent workers each do the first use and block; psutil
   reads their USS and PSS and their zygote's PSS (MB = 2^20 bytes). On
   the `--prefork 0` reforked server at generation 1 and at generation 2,
   and on the control at the time of the second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from zygote import Zygote
from zygote.errors import ZygoteError

from .common import PRELOAD, machine, percentile, preload_versions, zygote_server

APP = "benchmarks.refork_app"
TASK = f"{APP}:lazy_first_use"
HOLD = f"{APP}:hold"
MB = 2**20

R0 = "reforked, --prefork 0"
R2 = "reforked, --prefork 2"
CONTROL = "control, --prefork 0"
SERVERS = {R0: ["--prefork", "0"], R2: ["--prefork", "2"], CONTROL: ["--prefork", "0"]}
REFORKED = (R0, R2)


def wait_until(check: Any, what: str, timeout: float = 60.0, every: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


def settle(client: Zygote) -> dict[str, Any]:
    """Wait until the server is at rest: no worker, nothing queued, no
    incoming generation, the zygote ready and the pool full."""

    def at_rest() -> dict[str, Any] | None:
        s = client.stats()
        quiet = s["workers"] == 0 and s["queued"] == 0 and s["incoming_generation"] is None
        full = s["pool_ready"] >= s["pool_size"]
        return s if quiet and full and s["zygote_state"] == "ready" else None

    stats: dict[str, Any] = wait_until(at_rest, "the server to settle")
    return stats


def one_sample(client: Zygote) -> dict[str, Any]:
    """Spawn -> result of a no-op, then of the lazy task, each from a
    settled server: what a spawn costs, and what the first use adds."""
    settle(client)
    start = time.perf_counter()
    client.spawn("benchmarks.jobs:noop").result()
    noop = time.perf_counter() - start
    settle(client)
    start = time.perf_counter()
    handle = client.spawn(TASK)
    result = handle.result()
    elapsed = time.perf_counter() - start
    return {
        "ms": elapsed * 1000,
        "noop_ms": noop * 1000,
        "generation": handle.generation,
        "was_loaded": result["was_loaded"],
        "lazy_ms": result["lazy_ms"],
    }


def latency_rounds(clients: dict[str, Zygote], n: int) -> dict[str, list[dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    order = list(clients.items())
    for _ in range(n):
        order.append(order.pop(0))  # rotate: no server always goes first
        for name, client in order:
            samples[name].append(one_sample(client))
    return samples


def refork_now(endpoint: str, client: Zygote) -> dict[str, Any]:
    """`refork()` from a second client, in a thread (it blocks until the new
    generation serves); once the request is pending, a candidate task. The
    time from the candidate's result to refork() returning is the cost of
    making the new generation."""
    settle(client)
    outcome: dict[str, Any] = {}

    def ask() -> None:
        with Zygote(endpoint, timeout=120) as other:
            outcome["asked"] = time.perf_counter()
            try:
                outcome["generation"] = other.refork()
            except ZygoteError as exc:
                outcome["error"] = str(exc)
            outcome["returned"] = time.perf_counter()

    thread = threading.Thread(target=ask)
    thread.start()
    wait_until(lambda: client.stats()["refork_requested"], "the refork request", 30)
    spawned = time.perf_counter()
    handle = client.spawn(TASK)
    candidate = handle.result()
    result_at = time.perf_counter()
    thread.join(150)
    if thread.is_alive():
        raise RuntimeError("refork() did not return within 150 s")
    exit_info = handle.wait(30)
    if "error" in outcome:
        raise RuntimeError(f"refork failed: {outcome['error']} (candidate exit: {exit_info})")
    return {
        "generation": outcome["generation"],
        "candidate_generation": handle.generation,
        "candidate_ms": (result_at - spawned) * 1000,
        "candidate_was_loaded": candidate["was_loaded"],
        "result_to_serving_ms": (outcome["returned"] - result_at) * 1000,
        "request_to_serving_ms": (outcome["returned"] - outcome["asked"]) * 1000,
        "candidate_exit": exit_info.description,
    }


def reload_now(client: Zygote) -> dict[str, Any]:
    """`reload()`, then poll stats until the new generation is the ready one."""
    settle(client)
    start = time.perf_counter()
    generation = client.reload()
    returned = time.perf_counter()

    def serving() -> bool:
        s = client.stats()
        return bool(s["generation"] == generation and s["zygote_state"] == "ready")

    wait_until(serving, f"generation {generation}", 150)
    done = time.perf_counter()
    return {
        "generation": generation,
        "call_ms": (returned - start) * 1000,
        "trigger_to_serving_ms": (done - start) * 1000,
    }


def workers_memory(client: Zygote, count: int = 8) -> dict[str, Any]:
    """`count` concurrent workers that did the lazy first use, blocked: their
    USS/PSS and their zygote's PSS, in MB."""
    settle(client)
    tmp = Path(tempfile.mkdtemp(prefix="zyb-refork-", dir="/tmp"))
    ready, release = tmp / "ready", tmp / "release"
    ready.mkdir()
    try:
        handles = [client.spawn(HOLD, str(ready), str(release)) for _ in range(count)]
        wait_until(lambda: len(os.listdir(ready)) == count, "workers to be ready", 120, 0.02)
        infos = [psutil.Process(h.pid).memory_full_info() for h in handles]
        zygote_pid = client.stats()["zygote_pid"]
        zygote_pss = psutil.Process(zygote_pid).memory_full_info().pss
        release.touch()
        results = [h.result() for h in handles]
    finally:
        release.touch()
        shutil.rmtree(tmp, ignore_errors=True)
    uss = [info.uss / MB for info in infos]
    pss = [info.pss / MB for info in infos]
    return {
        "generation": handles[0].generation,
        "generations": sorted({h.generation for h in handles}),
        "was_loaded": sum(bool(r["was_loaded"]) for r in results),
        "uss_median": statistics.median(uss),
        "uss_max": max(uss),
        "pss_median": statistics.median(pss),
        "pss_total": sum(pss),
        "zygote_pss": zygote_pss / MB,
        "total_with_zygote": sum(pss) + zygote_pss / MB,
    }


def server_warnings(endpoint: str) -> list[str]:
    """What the server logged (at WARNING and above: `zygote_server`'s level)."""
    log = Path(endpoint.removeprefix("ipc://")).parent / "server.log"
    with contextlib.suppress(OSError):
        return [line for line in log.read_text().splitlines() if line.strip()]
    return []


def describe(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [s["ms"] / 1000 for s in samples]
    return {
        "n": len(samples),
        "p50": percentile(ms, 50) * 1000,
        "p90": percentile(ms, 90) * 1000,
        "noop_p50": percentile([s["noop_ms"] for s in samples], 50),
        "lazy_ms_median": statistics.median(s["lazy_ms"] for s in samples),
        "was_loaded": sum(bool(s["was_loaded"]) for s in samples),
        "generations": sorted({s["generation"] for s in samples}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20, help="latency rounds before and after")
    parser.add_argument("--rounds", type=int, default=3, help="extra reload+refork pairs")
    parser.add_argument("--quick", action="store_true", help="-n 5 --rounds 1")
    parser.add_argument("--json", type=Path, help="write every figure and sample here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds = 5, 1
    began = time.monotonic()
    record: dict[str, Any] = {"machine": machine(), "n": args.n, "rounds": args.rounds}
    warnings: dict[str, list[str]] = {}
    with contextlib.ExitStack() as stack:
        endpoints: dict[str, str] = {}
        clients: dict[str, Zygote] = {}
        for name, options in SERVERS.items():
            endpoint = stack.enter_context(
                zygote_server("--max-workers", "8", *options, preload=(*PRELOAD, APP))
            )
            endpoints[name] = endpoint
            clients[name] = stack.enter_context(Zygote(endpoint, timeout=120))
        for client in clients.values():  # warm-up: nothing lazy
            for _ in range(5):
                client.spawn("benchmarks.jobs:noop").result()

        threads = {"before": {name: c.stats()["threads"] for name, c in clients.items()}}
        before = latency_rounds(clients, args.n)
        memory = {"generation 1 (before)": workers_memory(clients[R0])}
        reforks: dict[str, list[dict[str, Any]]] = {name: [] for name in REFORKED}
        for name in REFORKED:
            reforks[name].append(refork_now(endpoints[name], clients[name]))
        threads["after"] = {name: c.stats()["threads"] for name, c in clients.items()}
        after = latency_rounds(clients, args.n)
        memory["generation 2 (after refork)"] = workers_memory(clients[R0])
        memory["control, generation 1 (after)"] = workers_memory(clients[CONTROL])

        reloads: dict[str, list[dict[str, Any]]] = {name: [] for name in REFORKED}
        for _ in range(args.rounds):
            for name in REFORKED:
                reloads[name].append(reload_now(clients[name]))
                reforks[name].append(refork_now(endpoints[name], clients[name]))
        final = {name: client.stats() for name, client in clients.items()}
        for name, endpoint in endpoints.items():
            warnings[name] = server_warnings(endpoint)

    latency = {
        name: {"before": describe(before[name]), "after": describe(after[name])} for name in SERVERS
    }
    record.update(
        preload=preload_versions(),
        latency=latency,
        samples={"before": before, "after": after},
        reforks=reforks,
        reloads=reloads,
        memory=memory,
        zygote_threads=threads,
        final_stats={
            name: {k: s[k] for k in ("generation", "reforks", "refork_failures", "refork_refused")}
            for name, s in final.items()
        },
        server_warnings=warnings,
        seconds=time.monotonic() - began,
    )
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=str))
    report(record)


def report(record: dict[str, Any]) -> None:
    print(f"# {record['machine']}; {record['preload']}; n={record['n']}")
    print()
    print("First task: spawn -> result of refork_app:lazy_first_use (ms)")
    print()
    print(
        "| server | before p50 | before p90 | after p50 | after p90 "
        "| after/before p50 | in-task first use, before / after (median) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in record["latency"].items():
        b, a = row["before"], row["after"]
        print(
            f"| {name} | {b['p50']:.1f} | {b['p90']:.1f} | {a['p50']:.1f} | {a['p90']:.1f} "
            f"| {a['p50'] / b['p50']:.3f}× "
            f"| {b['lazy_ms_median']:.1f} / {a['lazy_ms_median']:.1f} |"
        )
    control = record["latency"][CONTROL]["after"]["p50"]
    for name in REFORKED:
        after = record["latency"][name]["after"]["p50"]
        print(f"after the refork, {name} vs the control in the same rounds: {after / control:.3f}×")
    for name, row in record["latency"].items():
        b, a = row["before"], row["after"]
        print(
            f"{name}: generations {b['generations']} -> {a['generations']}; "
            f"found it loaded {b['was_loaded']}/{b['n']} -> {a['was_loaded']}/{a['n']}; "
            f"no-op spawn p50 {b['noop_p50']:.1f} -> {a['noop_p50']:.1f} ms; zygote threads "
            f"{thread_names(record['zygote_threads']['before'][name])} -> "
            f"{thread_names(record['zygote_threads']['after'][name])}"
        )
    print()
    print("Trigger to serving (ms)")
    print()
    print(
        "| server | refork: candidate result -> refork() returns | request -> returns "
        "| reload: reload() -> new generation ready | n refork / reload |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name in REFORKED:
        forks, loads = record["reforks"][name], record["reloads"][name]
        r2s = [f["result_to_serving_ms"] for f in forks]
        q2s = [f["request_to_serving_ms"] for f in forks]
        l2s = [r["trigger_to_serving_ms"] for r in loads]
        print(f"| {name} | {span(r2s)} | {span(q2s)} | {span(l2s)} | {len(forks)} / {len(loads)} |")
    for name in REFORKED:
        for fork in record["reforks"][name]:
            print(
                f"  {name}: -> generation {fork['generation']}: candidate "
                f"{fork['candidate_ms']:.0f} ms (warm: {fork['candidate_was_loaded']}), "
                f"result -> serving {fork['result_to_serving_ms']:.0f} ms; "
                f"exit: {fork['candidate_exit']!r}"
            )
    print()
    print("Memory of 8 workers after the first use, blocked (MB)")
    print()
    print(
        "| workers of | USS median | USS max | PSS median | PSS total (8) "
        "| zygote PSS | total with zygote |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, m in record["memory"].items():
        print(
            f"| {name} (gen {m['generation']}, loaded {m['was_loaded']}/8) "
            f"| {m['uss_median']:.1f} | {m['uss_max']:.1f} | {m['pss_median']:.1f} "
            f"| {m['pss_total']:.1f} | {m['zygote_pss']:.1f} | {m['total_with_zygote']:.1f} |"
        )
    print()
    print(f"final stats: {json.dumps(record['final_stats'])}")
    for name, lines in record["server_warnings"].items():
        for line in lines:
            print(f"server log, {name}: {line}")
    print(f"took {record['seconds']:.0f} s")


def thread_names(threads: list[dict[str, Any]]) -> str:
    """The threads a zygote reported, in words."""
    return "; ".join(str(t.get("description", t)) for t in threads) or "none"


def span(values: list[float]) -> str:
    """The median, then the range."""
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


if __name__ == "__main__":
    main()
