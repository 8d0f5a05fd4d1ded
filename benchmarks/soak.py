"""Soak: minutes of mixed load and chaos on a real server, counting what
went missing.

    python -m benchmarks.soak [--minutes 5] [--clients 4] [--json PATH]

One `zygote start` (numpy and benchmarks.soak_app preloaded, `--max-workers
4`, `--max-message-bytes 1 MiB`), and, all at once for `--minutes`:

- `--clients` client threads, each with its own connection and up to 4 jobs
  in flight: short jobs, failing ones (raise, sys.exit, os._exit), slow ones
  (some past their `_timeout`), payloads and results near the message limit,
  and now and then a payload over it (refused by the client);
- a `map()` of 8 items every 2 s;
- SIGKILL of a running slow job's worker every 0.5 s (through a pidfd taken
  when its spawn returned: no pid reuse), of the zygote every 20 s;
- a refork or a reload, alternately, every 15 s;
- garbage frames on a bare socket every 20 ms: random bytes, msgpack that is
  no request, multi-frame messages, frames over the limit, and now and then
  one past libzmq's own limit;
- a sampler: the supervisor's RSS and descriptors, and the zombies under it,
  every second.

Every task first appends its job id to a marker file. At the end: jobs
submitted (a spawn that returned a handle, or a map item), completed (an
outcome arrived: a value, an error, a WorkerLost for a killed worker...),
lost (no outcome, or the server no longer knew the job), duplicated (a job
id in the marker file twice: a task run twice), ran without a handle, zombies
(sampled, lingering 3 samples or more, and left at the end), the
supervisor's RSS and descriptors (start, max, end), and errors by type.
Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

from zygote import TaskError, TaskTimeout, WorkerLost, Zygote
from zygote.errors import ServerUnavailable, ZygoteError, ZygoteTimeout

from .common import REPO, machine, zygote_server

APP = "benchmarks.soak_app"
MAX_MESSAGE = 1 << 20
WINDOW = 4  # jobs in flight per client
RESULT_TIMEOUT = 120.0  # a job with no outcome by then is lost
RESULTS = REPO / "benchmarks" / "results" / "soak.json"
MB = 2**20


class Ledger:
    """What happened, counted from every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted: set[str] = set()
        self.outcomes: dict[str, str] = {}
        self.lost: dict[str, str] = {}  # job -> why
        self.unexpected: dict[str, str] = {}  # job -> what came instead
        self.killed: set[str] = set()
        self.uncertain: set[str] = set()  # spawn timed out: may run or not
        self.errors: collections.Counter[str] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()

    def error(self, where: str, exc: BaseException) -> None:
        with self.lock:
            self.errors[f"{where}: {type(exc).__name__}"] += 1

    def count(self, event: str, n: int = 1) -> None:
        with self.lock:
            self.events[event] += n


class Soak:
    """The run's shared state and its threads."""

    def __init__(self, endpoint: str, args: argparse.Namespace, marker: Path) -> None:
        self.endpoint = endpoint
        self.args = args
        self.marker = marker
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.running: dict[str, int] = {}  # slow job -> pidfd of its worker
        self.running_lock = threading.Lock()
        with Zygote(endpoint, timeout=30) as client:
            self.supervisor = psutil.Process(client.stats()["pid"])
        self.samples: list[dict[str, Any]] = []

    # -- clients ------------------------------------------------------------

    def choose(
        self, rng: random.Random, job: str
    ) -> tuple[str, tuple[Any, ...], dict[str, Any], str]:
        """A job: task, arguments, spawn options, and the outcome expected."""
        roll = rng.random()
        if roll < 0.55:
            x = rng.randrange(1000)
            return "short", (job, x), {}, f"ok {x * 2}"
        if roll < 0.70:
            how = rng.choice(["raise", "exit", "_exit"])
            expect = {"raise": "raised ValueError", "exit": "raised SystemExit"}
            return "fail", (job, how), {}, expect.get(how, "worker_lost")
        if roll < 0.90:
            seconds = rng.uniform(0.05, 1.5)
            if rng.random() < 0.25:
                return "slow", (job, seconds), {"_timeout": seconds / 3}, "timeout"
            return "slow", (job, seconds), {}, f"ok {job}"
        if roll < 0.95:
            size = MAX_MESSAGE - 2048 - rng.randrange(8192)
            return "big", (job, b"p" * size), {}, f"ok {size}"
        if roll < 0.98:
            size = rng.choice([MAX_MESSAGE - 4096, MAX_MESSAGE + 1000])
            wanted = f"ok {size}" if size < MAX_MESSAGE else "raised ValueError"
            return "big_result", (job, size), {}, wanted
        return "big", (job, b"o" * (MAX_MESSAGE + 1000)), {}, "refused"

    def client(self, i: int) -> None:
        """Spawn, keep up to WINDOW jobs in flight, take every outcome."""
        rng = random.Random(self.args.seed * 1000 + i)
        ledger = self.ledger
        inflight: collections.deque[tuple[str, str, Any]] = collections.deque()
        with Zygote(self.endpoint, timeout=60) as client:
            for n in range(10**9):
                if self.stop.is_set() and not inflight:
                    return
                if not self.stop.is_set() and len(inflight) < WINDOW:
                    job = f"c{i}-{n}"
                    task, fargs, options, expect = self.choose(rng, job)
                    try:
                        handle = client.spawn(f"{APP}:{task}", *fargs, **options)
                    except ValueError as exc:
                        ledger.count("refused by the client: over the limit")
                        assert expect == "refused", exc
                        continue
                    except ZygoteError as exc:
                        ledger.error("spawn", exc)
                        if isinstance(exc, ZygoteTimeout | ServerUnavailable):
                            with ledger.lock:
                                ledger.uncertain.add(job)
                        continue
                    with ledger.lock:
                        ledger.submitted.add(job)
                    if task == "slow":
                        with contextlib.suppress(OSError), self.running_lock:
                            self.running[job] = os.pidfd_open(handle.pid)
                    inflight.append((job, expect, handle))
                    continue
                job, expect, handle = inflight.popleft()
                try:
                    self.outcome(job, expect, handle)
                finally:
                    with self.running_lock:
                        pidfd = self.running.pop(job, None)
                    if pidfd is not None:
                        os.close(pidfd)

    def outcome(self, job: str, expect: str, handle: Any) -> None:
        ledger = self.ledger
        try:
            value = handle.result(timeout=RESULT_TIMEOUT)
            got = f"ok {len(value) if isinstance(value, bytes) else value}"
        except TaskTimeout:
            got = "timeout"
        except WorkerLost as exc:
            if "lost track" in str(exc):  # the server forgot it: a loss
                with ledger.lock:
                    ledger.lost[job] = str(exc)
                return
            got = "worker_lost"
        except TaskError as exc:
            got = f"raised {exc.exc_type}"
        except ZygoteError as exc:  # no outcome in time, or no server
            ledger.error("result", exc)
            with ledger.lock:
                ledger.lost[job] = f"{type(exc).__name__}: {exc}"
            return
        with ledger.lock:
            ledger.outcomes[job] = got
            if got != expect and job not in ledger.killed:
                ledger.unexpected[job] = f"expected {expect}, got {got}"[:300]

    def mapper(self) -> None:
        """map() of 8 items every 2 s."""
        with Zygote(self.endpoint, timeout=60) as client:
            for k in range(10**9):
                if self.stop.wait(2.0):
                    return
                items = [[f"m{k}-{j}", j] for j in range(8)]
                with self.ledger.lock:
                    self.ledger.submitted.update(str(item[0]) for item in items)
                try:
                    values = list(client.map(f"{APP}:square", items, timeout=RESULT_TIMEOUT))
                except ZygoteError as exc:
                    self.ledger.error("map", exc)
                    ids = {str(item[0]) for item in items}
                    with self.ledger.lock:  # map() gives no handles: whether they ran is unknown
                        self.ledger.submitted.difference_update(ids)
                        self.ledger.uncertain.update(ids)
                    continue
                with self.ledger.lock:
                    for item, value in zip(items, values, strict=True):
                        self.ledger.outcomes[str(item[0])] = f"ok {value}"
                        if value != int(item[1]) ** 2:  # type: ignore[call-overload]
                            self.ledger.unexpected[str(item[0])] = f"map gave {value}"

    # -- chaos --------------------------------------------------------------

    def worker_killer(self) -> None:
        rng = random.Random(self.args.seed)
        while not self.stop.wait(0.5):
            with self.running_lock:
                if not self.running:
                    continue
                job = rng.choice(sorted(self.running))
                try:
                    signal.pidfd_send_signal(self.running[job], signal.SIGKILL)
                except ProcessLookupError:
                    self.ledger.count("worker kills: already gone")
                    continue
            with self.ledger.lock:
                self.ledger.killed.add(job)
            self.ledger.count("worker kills (SIGKILL)")

    def zygote_killer(self) -> None:
        with Zygote(self.endpoint, timeout=30) as client:
            while not self.stop.wait(self.args.zygote_kill_every):
                try:
                    pid = client.stats()["zygote_pid"]
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        self.ledger.count("zygote kills (SIGKILL)")
                except (ZygoteError, ProcessLookupError) as exc:
                    self.ledger.error("zygote kill", exc)

    def generations(self) -> None:
        with Zygote(self.endpoint, timeout=60) as client:
            for n in range(10**9):
                if self.stop.wait(15.0):
                    return
                what = "refork" if n % 2 == 0 else "reload"
                try:
                    client.refork() if what == "refork" else client.reload()
                    self.ledger.count(f"{what}s")
                except ZygoteError as exc:
                    self.ledger.error(what, exc)

    def garbage(self) -> None:
        """Bad frames on a bare socket; every answer must be an error."""
        rng = random.Random(self.args.seed + 7)
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        ledger = self.ledger
        try:
            while not self.stop.wait(0.02):
                roll = rng.random()
                if roll < 0.02:  # past libzmq's limit: dropped, with the connection
                    throwaway = context.socket(zmq.DEALER)
                    throwaway.setsockopt(zmq.LINGER, 1000)
                    throwaway.connect(self.endpoint)
                    throwaway.send(b"\0" * (3 * MAX_MESSAGE))
                    throwaway.close()
                    ledger.count("garbage: frames past libzmq's limit")
                    continue
                if roll < 0.10:
                    sock.send_multipart([rng.randbytes(8), rng.randbytes(8)])
                    ledger.count("garbage: multi-frame messages")
                    continue
                if roll < 0.15:
                    frame = msgpack.packb(
                        {"v": 1, "kind": "ping", "req": 1, "pad": b"g" * MAX_MESSAGE}
                    )
                elif roll < 0.50:
                    frame = rng.randbytes(rng.randrange(1, 300))
                elif roll < 0.70:
                    frame = msgpack.packb([rng.random(), "not a map"])
                else:
                    field = rng.choice(["task", "payload", "handle", "v", "kind"])
                    body = {"v": 1, "kind": "spawn", "req": 2, "task": "not a task", "payload": b""}
                    frame = msgpack.packb({**body, field: rng.choice([None, 5, "", [1], {}])})
                sock.send(frame)
                ledger.count("garbage: frames answered with an error")
                while sock.poll(0):
                    reply = msgpack.unpackb(sock.recv())
                    if reply.get("kind") != "error":
                        ledger.count(f"garbage: a {reply.get('kind')} reply (not an error)")
        finally:
            sock.close()

    def sampler(self) -> None:
        """The supervisor's RSS, descriptors and the zombies under it, every second."""
        seen: dict[int, int] = {}  # zombie pid -> consecutive samples
        lingering: set[int] = set()
        while not self.stop.wait(1.0):
            sample = self.sample()
            current = set(sample.pop("zombie_pids"))
            seen = {pid: seen.get(pid, 0) + 1 for pid in current}
            lingering.update(pid for pid, n in seen.items() if n >= 3)
            sample["lingering"] = len(lingering)
            self.samples.append(sample)

    def sample(self) -> dict[str, Any]:
        zombies = []
        for child in self.supervisor.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() == psutil.STATUS_ZOMBIE:
                    zombies.append(child.pid)
        return {
            "t": time.monotonic(),
            "rss_mb": self.supervisor.memory_info().rss / MB,
            "fds": self.supervisor.num_fds(),
            "zombies": len(zombies),
            "zombie_pids": zombies,
        }

    # -- the run --------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with Zygote(self.endpoint, timeout=30) as client:  # warm up
            for n in range(20):
                client.spawn(f"{APP}:short", f"w{n}", n).result()
        start = self.sample()
        threads = [
            threading.Thread(target=self.client, args=(i,)) for i in range(self.args.clients)
        ]
        threads += [
            threading.Thread(target=target)
            for target in (
                self.mapper,
                self.worker_killer,
                self.zygote_killer,
                self.generations,
                self.garbage,
                self.sampler,
            )
        ]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        self.stop.wait(self.args.minutes * 60)
        self.stop.set()
        for thread in threads:
            thread.join(RESULT_TIMEOUT + 60)
        duration = time.monotonic() - began
        return self.report(start, duration)

    def report(self, start: dict[str, Any], duration: float) -> dict[str, Any]:
        with Zygote(self.endpoint, timeout=30) as client:
            deadline = time.monotonic() + 30
            while client.stats()["workers"] and time.monotonic() < deadline:
                time.sleep(0.1)
            stats = client.stats()
        deadline = time.monotonic() + 10
        while (end := self.sample())["zombies"] and time.monotonic() < deadline:
            time.sleep(0.2)
        runs = collections.Counter(self.marker.read_text().split())
        ledger = self.ledger
        samples = [start, *self.samples, end]
        lost = {job: why for job, why in ledger.lost.items()}
        lost.update(
            {job: "no outcome" for job in ledger.submitted - set(ledger.outcomes) - set(lost)}
        )
        killed_lost = sum(ledger.outcomes.get(job) == "worker_lost" for job in ledger.killed)
        return {
            "minutes": self.args.minutes,
            "duration_s": round(duration, 1),
            "clients": self.args.clients,
            "seed": self.args.seed,
            "commit": _commit(),
            "machine": machine(),
            "jobs": {
                "submitted": len(ledger.submitted),
                "completed": len(ledger.outcomes),
                "lost": len(lost),
                "duplicated": sum(1 for n in runs.values() if n > 1),
                "ran_without_handle": len(
                    {job for job in runs if job[0] != "w"} - ledger.submitted - ledger.uncertain
                ),
                "spawn_uncertain": len(ledger.uncertain),
                "unexpected_outcome": len(ledger.unexpected),
                "killed": len(ledger.killed),
                "killed_and_lost": killed_lost,
                "outcomes": collections.Counter(o.split(" ")[0] for o in ledger.outcomes.values()),
            },
            "examples": {
                "lost": dict(list(lost.items())[:10]),
                "unexpected": dict(list(ledger.unexpected.items())[:10]),
                "duplicated": [job for job, n in runs.items() if n > 1][:10],
            },
            "events": dict(ledger.events),
            "errors": dict(ledger.errors),
            "zombies": {
                "max_sampled": max(s["zombies"] for s in samples),
                "lingering": max((s.get("lingering", 0) for s in samples), default=0),
                "at_end": end["zombies"],
            },
            "supervisor": {
                "rss_mb": [
                    round(start["rss_mb"], 1),
                    round(max(s["rss_mb"] for s in samples), 1),
                    round(end["rss_mb"], 1),
                ],
                "fds": [start["fds"], max(s["fds"] for s in samples), end["fds"]],
            },
            "server_stats": {
                key: stats.get(key)
                for key in (
                    "accepted",
                    "completed",
                    "failed_starts",
                    "generation",
                    "rejected_messages",
                    "internal_errors",
                    "busy_rejections",
                    "results_kept",
                )
            },
        }


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        " (dirty)" if git("status", "--porcelain") else ""
    )


def print_report(record: dict[str, Any]) -> None:
    jobs, sup, zombies = record["jobs"], record["supervisor"], record["zombies"]
    print(f"soak: {record['minutes']} min, {record['clients']} clients, commit {record['commit']}")
    print(f"  {record['machine']}")
    for key, value in jobs.items():
        print(f"  {key:>20}: {dict(value) if isinstance(value, dict) else value}")
    print(f"  {'zombies':>20}: {zombies}")
    print(f"  {'supervisor RSS MB':>20}: start/max/end {sup['rss_mb']}")
    print(f"  {'supervisor fds':>20}: start/max/end {sup['fds']}")
    print(f"  {'events':>20}: {record['events']}")
    print(f"  {'errors':>20}: {record['errors']}")
    print(f"  {'server stats':>20}: {record['server_stats']}")
    for what, examples in record["examples"].items():
        if examples:
            print(f"  {what}: {examples}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--zygote-kill-every", type=float, default=20.0, help="seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS, help="where the figures go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zysoak-") as tmp:
        marker = Path(tmp) / "runs"
        marker.touch()
        options = (
            "--max-workers",
            "4",
            "--max-message-bytes",
            str(MAX_MESSAGE),
            "--refork-timeout",
            "10",
        )
        with zygote_server(
            *options, preload=("numpy", APP), env={"ZYGOTE_SOAK_MARKER": str(marker)}
        ) as endpoint:
            record = Soak(endpoint, args, marker).run()
    record["command"] = "python -m benchmarks.soak " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"
    )
    print_report(record)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()
