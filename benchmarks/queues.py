"""Job queues on zygote against their own workers: Celery's ZygotePool and
RQ's ZygoteWorker, throughput and enqueue -> result latency.

    python -m benchmarks.queues [--rounds 3] [-n 25] [--quick] [--json PATH]

Seven configurations, all with concurrency 2, their workers started together
and left running side by side for the whole run (each on a queue of its
own, Redis db 7, flushed first), measured in one run, interleaved:

* Celery, one `celery -A benchmarks.queues_app worker -c 2
  --without-mingle --without-gossip` each:
  - ZygotePool: `-P custom`, CELERY_CUSTOM_WORKER_POOL=zygote_celery:ZygotePool
    (an embedded zygote server preloading the app module); a fresh fork
    per task; and the same with ZYGOTE_REFORK_AFTER=50,1000;
  - prefork, `--max-tasks-per-child 1`: a fresh pool process per task;
  - prefork: two long-lived pool processes;
  - only if named with --only, what the pool's choices are worth: ZygotePool
    with ZYGOTE_CELERY_STORE_IN_FORK=1 (each fork stores its result itself,
    on a new Redis connection), and with ZYGOTE_MAX_WORKERS=2 (the server's
    slots equal to -c, rather than twice as many).
* RQ, two `rq worker` processes on one queue each:
  - ZygoteWorker: `-w zygote_rq.ZygoteWorker`, ZYGOTE_PRELOAD=benchmarks.queues_app.
    Each worker starts its own embedded zygote server: what the command
    does with no $ZYGOTE_ENDPOINT, so what a user gets by default;
  - Worker: RQ's default; its work horse, a fork of the worker, imports the
    job's module (numpy, pandas) after the fork, in every job;
  - SimpleWorker: `-w rq.worker.SimpleWorker`, the job runs in the worker
    itself, no fork.

The zygote configurations get ZYGOTE_ALLOW_THREADS=benchmarks.queues_app, as
the server's warning advises for numpy's OpenBLAS pool (it only silences
the warning: the fork guards stay on).

The task, `benchmarks.queues_app.summarize`: a 1,000-row DataFrame grouped
by sensor (about 1.5 ms in a warm process). It returns its pid, its start
and end on CLOCK_MONOTONIC (system-wide, so comparable with this process's
clock) and the minor page faults it took.

Every worker first runs a few tasks (8 at once, then 3 one by one). Then:

1. Throughput: N tasks enqueued at once from this process, timed from the
   first enqueue to the last result; `--rounds` rounds, the order of the
   configurations rotated every round; the median. N is 200, or 40 for the
   slow configurations (prefork --max-tasks-per-child 1, RQ Worker). The
   machine's CPU use (/proc/stat) during each batch is recorded too, and
   the CPU time of the workers' process trees (psutil; a process forked
   per task counts in its reaper's children time) and of this process.
2. Latency: one task at a time, enqueue -> result, 10 ms pause after each,
   one sample per configuration per round, the order rotated: p50, p90 and
   the mean. Each sample is split with the task's own stamps: enqueue ->
   task start, in the task, task end -> result here.

Before the workers start, a helper process measures what a fresh fork pays
that a reused process does not (`fork_probe`): the task's first call, and
a Redis client's first command, in forks of a process set up like the
zygotes here, against the same in a warm process.

`--quick` is a smoke run: 10 tasks are too few for the slow baselines,
whose stalls then weigh more, so its ratios are not figures.

Workers are stopped with SIGTERM (warm shutdown), killed (their process
group) after 30 s; any descendant left after that is killed by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from .common import REPO, machine, percentile, preload_versions

APP = "benchmarks.queues_app"
REDIS_URL = "redis://127.0.0.1:6379/7"  # the only database this benchmark touches
PAUSE = 0.010  # after every latency sample, as in the other benchmarks
WARM_BATCH, WARM_SEQUENTIAL = 8, 3
START_TIMEOUT = 120.0  # a worker's start-up and its first task (a cold zygote boots)
RESULT_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
SETTLE = 0.5  # after a throughput batch, before the next
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")  # /proc/stat's unit
CLIENT = psutil.Process()  # this process: enqueues and collects
TARGET = 10.0  # the issue: zygote >= 10x the fresh-process baseline of its queue


@dataclass(frozen=True)
class Config:
    """One way of running the task: a framework, its options, its environment."""

    key: str
    label: str
    framework: str  # "celery" or "rq"
    options: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    fresh: bool = False  # a fresh process per task, by design
    slow: bool = False  # throughput batches of --n-slow tasks


# `zygote start` reads --allow-thread from $ZYGOTE_ALLOW_THREADS (the setting's name).
ZYGOTE_ENV = {"ZYGOTE_ALLOW_THREADS": APP}
CONFIGS = (
    Config(
        "celery-zygote",
        "Celery ZygotePool (`-P custom -c 2`)",
        "celery",
        ("-P", "custom"),
        {"CELERY_CUSTOM_WORKER_POOL": "zygote_celery:ZygotePool", **ZYGOTE_ENV},
        fresh=True,
    ),
    Config(
        "celery-zygote-refork",
        "Celery ZygotePool, `ZYGOTE_REFORK_AFTER=50,1000`",
        "celery",
        ("-P", "custom"),
        {
            "CELERY_CUSTOM_WORKER_POOL": "zygote_celery:ZygotePool",
            # One worker that has run tasks becomes the zygote after 50
            # spawns (then after 1000): its forks start warm (docs/generations.md).
            "ZYGOTE_REFORK_AFTER": "50,1000",
            **ZYGOTE_ENV,
        },
        fresh=True,
    ),
    Config(
        "celery-prefork-mtpc1",
        "Celery prefork (`-c 2 --max-tasks-per-child 1`)",
        "celery",
        ("--max-tasks-per-child", "1"),
        fresh=True,
        slow=True,
    ),
    Config("celery-prefork", "Celery prefork (`-c 2`)", "celery"),
    Config(
        "rq-zygote",
        "RQ ZygoteWorker (2 × `-w zygote_rq.ZygoteWorker`)",
        "rq",
        ("-w", "zygote_rq.ZygoteWorker"),
        {"ZYGOTE_PRELOAD": APP, **ZYGOTE_ENV},
        fresh=True,
    ),
    Config("rq-worker", "RQ Worker (2 × `rq worker`)", "rq", fresh=True, slow=True),
    Config(
        "rq-simple",
        "RQ SimpleWorker (2 × `-w rq.worker.SimpleWorker`)",
        "rq",
        ("-w", "rq.worker.SimpleWorker"),
    ),
)
#: run only when named with --only: what one of the pool's choices is worth
EXTRA_CONFIGS = (
    Config(
        "celery-zygote-store-in-fork",
        "Celery ZygotePool, `ZYGOTE_CELERY_STORE_IN_FORK=1`",
        "celery",
        ("-P", "custom"),
        {
            "CELERY_CUSTOM_WORKER_POOL": "zygote_celery:ZygotePool",
            # Each fork stores its result on a Redis connection of its own,
            # as before the pool stored what its forks leave it.
            "ZYGOTE_CELERY_STORE_IN_FORK": "1",
            **ZYGOTE_ENV,
        },
        fresh=True,
    ),
    Config(
        "celery-zygote-max-workers-c",
        "Celery ZygotePool, `ZYGOTE_MAX_WORKERS=2`",
        "celery",
        ("-P", "custom"),
        {
            "CELERY_CUSTOM_WORKER_POOL": "zygote_celery:ZygotePool",
            # The server's --max-workers equal to -c (the pool's default is
            # twice -c): a fork holds its slot until it has exited.
            "ZYGOTE_MAX_WORKERS": "2",
            **ZYGOTE_ENV,
        },
        fresh=True,
    ),
)
BY_KEY = {c.key: c for c in (*CONFIGS, *EXTRA_CONFIGS)}

#: (zygote, baseline, target): the first two are the issue's; the other
#: baselines reuse their processes, so they are expected to be faster.
COMPARISONS = (
    ("celery-zygote", "celery-prefork-mtpc1", TARGET),
    ("celery-zygote-refork", "celery-prefork-mtpc1", TARGET),
    ("celery-zygote-store-in-fork", "celery-prefork-mtpc1", TARGET),
    ("celery-zygote-max-workers-c", "celery-prefork-mtpc1", TARGET),
    ("celery-zygote", "celery-zygote-store-in-fork", None),
    ("celery-zygote", "celery-zygote-max-workers-c", None),
    ("rq-zygote", "rq-worker", TARGET),
    ("celery-zygote", "celery-prefork", None),
    ("rq-zygote", "rq-simple", None),
)


# -- workers ----------------------------------------------------------------


class Workers:
    """The worker processes of one configuration, and how to give them a
    task and get its result."""

    def __init__(self, config: Config, run_id: str, logdir: Path) -> None:
        self.config = config
        self.queue_name = f"zq-{run_id}-{config.key}"
        self.logs: list[Path] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []
        self._logdir = logdir
        self._run_id = run_id
        self._rq_queue: Any = None

    def start(self) -> None:
        """Start the worker processes (one for Celery -c 2, two for RQ)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ZYGOTE_", "CELERY_"))}
        env = {**base, "PYTHONUNBUFFERED": "1", **self.config.env}
        count = 1 if self.config.framework == "celery" else 2
        for index in range(count):
            name = f"{self.config.key}-{index}-{self._run_id}"
            if self.config.framework == "celery":
                command = [sys.executable, "-m", "celery", "-A", APP, "worker", "-c", "2"]
                command += ["-Q", self.queue_name, "-n", f"{name}@localhost", "-l", "warning"]
                command += ["--without-mingle", "--without-gossip", *self.config.options]
            else:
                command = [sys.executable, "-m", "rq.cli", "worker", "-u", REDIS_URL, "-n", name]
                command += [*self.config.options, self.queue_name]
            log = self._logdir / f"{name}.log"
            with open(log, "wb") as out:
                # A session of its own: a Ctrl-C here does not cold-kill it
                # mid-batch, and its process group can be killed as a whole.
                process = subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.processes.append(process)
            self.names.append(name)
            self.logs.append(log)

    def check_alive(self) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                raise RuntimeError(
                    f"{self.config.label}: a worker exited with status {process.returncode}:\n"
                    + log.read_text(errors="replace")[-4000:]
                )

    def wait_ready(self, connection: redis.Redis) -> None:
        """Until every worker is up (RQ: registered; Celery: it ran a task)."""
        if self.config.framework == "rq":
            from rq import Queue, Worker

            self._rq_queue = Queue(self.queue_name, connection=connection)
            deadline = time.monotonic() + START_TIMEOUT
            while {w.name for w in Worker.all(queue=self._rq_queue)} != set(self.names):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.config.label}: workers not registered")
                time.sleep(0.1)
        self.wait(self.send(0), START_TIMEOUT)

    def send(self, seed: int) -> Any:
        """Enqueue one task; its handle."""
        if self.config.framework == "celery":
            from .queues_app import summarize_task

            return summarize_task.apply_async((seed,), queue=self.queue_name)
        from .queues_app import summarize

        return self._rq_queue.enqueue(summarize, seed)

    def wait(self, handle: Any, timeout: float = RESULT_TIMEOUT) -> dict[str, Any]:
        """The task's result; raises if it failed or the workers died."""
        deadline = time.monotonic() + timeout
        while True:
            value = self._poll(handle)
            if value is not None:
                return value
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.config.label}: no result within {timeout:g} s")

    def _poll(self, handle: Any) -> dict[str, Any] | None:
        """The result, waiting up to a second for it (both block in Redis:
        Celery on its pub/sub channel, RQ on the job's result stream)."""
        if self.config.framework == "celery":
            from celery.exceptions import TimeoutError as CeleryTimeout

            try:
                value: dict[str, Any] = handle.get(timeout=1.0)
            except CeleryTimeout:
                return None
            return value
        from rq.results import Result

        result = handle.latest_result(timeout=1)
        if result is None:
            return None
        if result.type != Result.Type.SUCCESSFUL:
            raise RuntimeError(f"{self.config.label}: job {handle.id} failed:\n{result.exc_string}")
        value = result.return_value
        return value

    def jobs_per_worker(self) -> list[int]:
        """RQ: the jobs each worker completed (both should have worked)."""
        if self.config.framework != "rq":
            return []
        from rq import Worker

        counts = {w.name: w.successful_job_count for w in Worker.all(queue=self._rq_queue)}
        return [counts.get(name, 0) for name in self.names]

    def stop(self) -> list[str]:
        """SIGTERM (warm shutdown), then SIGKILL to the process group after
        STOP_TIMEOUT; then any descendant left (a zygote server, a horse) is
        killed by pid. The command lines of those leftovers."""
        family: list[psutil.Process] = []
        for process in self.processes:
            with contextlib.suppress(psutil.Error):
                family += psutil.Process(process.pid).children(recursive=True)
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # its own session: only its own
                process.wait()
        # The workers have exited: their descendants should follow at once
        # (an embedded server dies with its parent).
        _, alive = psutil.wait_procs(family, timeout=10)
        leftovers = []
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                leftovers.append(" ".join(proc.cmdline()))
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        return leftovers


# -- measurements -------------------------------------------------------------


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far: /proc/stat's first line, in ticks."""
    with open("/proc/stat") as stat:
        return [int(x) for x in stat.readline().split()[1:]]


def cpu_use(before: list[int], after: list[int]) -> dict[str, float]:
    """Busy and stolen shares of all CPUs between two cpu_ticks()."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta[:8]) or 1  # user..steal; guest time is inside user already
    idle = delta[3] + delta[4]  # idle, iowait
    return {"busy": (total - idle) / total, "steal": delta[7] / total}


def busy_seconds(before: list[int], after: list[int]) -> float:
    """CPU seconds the whole machine spent busy between two cpu_ticks()."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    return (sum(delta[:8]) - delta[3] - delta[4]) / TICKS_PER_SECOND


def redis_servers() -> list[psutil.Process]:
    """The Redis server's processes (read only: their CPU time is part of
    every configuration's cost)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "redis-server":
            found.append(proc)
    return found


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def cpu_by_process(workers: Workers) -> dict[int, tuple[float, float]]:
    """CPU seconds so far of every process in the workers' trees: pid ->
    (its own, its reaped children's). A worker forked per task (zygote's,
    RQ's horse, a prefork child replaced) lands in its reaper's second figure."""
    found: dict[int, tuple[float, float]] = {}
    for process in workers.processes:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(process.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    found[proc.pid] = (t.user + t.system, t.children_user + t.children_system)
    return found


def worker_cpu(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> dict[str, float]:
    """CPU seconds the workers used between two cpu_by_process(): in
    long-lived processes and in reaped per-task ones. A process that ended
    in between is counted whole by its reaper; one that began, from zero."""
    own = children = 0.0
    for pid, (own_after, children_after) in after.items():
        own_before, children_before = before.get(pid, (0.0, 0.0))
        own += own_after - own_before
        children += children_after - children_before
    return {"own": own, "children": children}


def warm_up(workers: Workers) -> None:
    """A few tasks at once (every process of the pool gets some), then a few one by one."""
    handles = [workers.send(i) for i in range(WARM_BATCH)]
    for handle in handles:
        workers.wait(handle)
    for i in range(WARM_SEQUENTIAL):
        workers.wait(workers.send(i))


def throughput(
    workers: Workers, n: int, seeds: Iterator[int], servers: list[psutil.Process]
) -> dict[str, Any]:
    """N tasks enqueued at once; first enqueue -> last result. With the CPU
    time it took: the machine's, the workers', this process's, Redis's."""
    ticks, processes, client = cpu_ticks(), cpu_by_process(workers), CLIENT.cpu_times()
    redis_before = cpu_seconds(servers)
    start = time.monotonic()
    handles = [workers.send(next(seeds)) for _ in range(n)]
    enqueued = time.monotonic()
    values = [workers.wait(handle) for handle in handles]
    end, machine_use = time.monotonic(), cpu_use(ticks, cpu_ticks())
    client_after = CLIENT.cpu_times()
    # What the batch left (horses and forks exiting, to be reaped; pools
    # refilling) is part of its cost: let it end before counting.
    time.sleep(SETTLE)
    used = worker_cpu(processes, cpu_by_process(workers))
    machine_seconds, redis_seconds = busy_seconds(ticks, cpu_ticks()), cpu_seconds(servers)
    return {
        "n": n,
        "seconds": end - start,
        "tasks_per_s": n / (end - start),
        "enqueue_seconds": enqueued - start,
        "processes": len({v["pid"] for v in values}),
        "task_ms_median": statistics.median((v["ended"] - v["started"]) * 1000 for v in values),
        "cpu": machine_use,
        "machine_cpu_ms_per_task": machine_seconds * 1000 / n,
        "redis_cpu_ms_per_task": (redis_seconds - redis_before) * 1000 / n,
        "worker_cpu_ms_per_task": {k: v * 1000 / n for k, v in used.items()},
        "client_cpu_ms_per_task": (
            (client_after.user + client_after.system - client.user - client.system) * 1000 / n
        ),
    }


def sample(workers: Workers, seed: int) -> dict[str, Any]:
    """One task alone: enqueue -> result, split with the task's own stamps."""
    start = time.monotonic()
    value = workers.wait(workers.send(seed))
    end = time.monotonic()
    return {
        "ms": (end - start) * 1000,
        "to_start_ms": (value["started"] - start) * 1000,
        "task_ms": (value["ended"] - value["started"]) * 1000,
        "from_end_ms": (end - value["ended"]) * 1000,
        "faults": value["faults"],
        "pid": value["pid"],
    }


def fork_probe(count: int) -> dict[str, Any]:
    """In a helper process (`--fork-probe N`): what a fresh fork pays that a
    reused process does not. Like the zygotes here: benchmarks.queues_app
    imported, a Redis client made but never connected, gc.freeze(). N forks
    each time summarize() twice and a Redis PING twice (the first one
    connects). Twice more with the parent's Redis client connected once
    (and closed) first, as a prefork child's or an RQ horse's parent has
    been; the second time with redis-py's DriverInfo given rather than
    looked up per connection. Last, the same steps in this process, warm."""
    import gc
    import resource

    from redis.driver_info import DriverInfo

    from . import queues_app

    def timings(client: redis.Redis, seed: int) -> list[float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        marks = [time.perf_counter()]
        steps = (
            lambda: queues_app.summarize(seed),
            lambda: queues_app.summarize(seed),
            client.ping,
            client.ping,
        )
        for step in steps:
            step()
            marks.append(time.perf_counter())
        ms = [(b - a) * 1000 for a, b in itertools.pairwise(marks)]
        return [*ms, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults]

    def forked(client: redis.Redis) -> list[list[float]]:
        gc.collect()
        gc.freeze()
        rows = []
        for seed in range(count):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report, then leave without cleanup
                try:
                    os.write(write, json.dumps(timings(client, seed)).encode())
                finally:
                    os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                rows.append(json.loads(pipe.read()))
            os.waitpid(pid, 0)
            time.sleep(PAUSE)
        return rows

    def connected_once(client: redis.Redis) -> redis.Redis:
        client.ping()
        client.connection_pool.disconnect()  # no socket shared with the forks
        return client

    series = {"fork, cold parent": forked(redis.Redis.from_url(REDIS_URL))}
    series["fork, parent connected once"] = forked(connected_once(redis.Redis.from_url(REDIS_URL)))
    client = connected_once(redis.Redis.from_url(REDIS_URL, driver_info=DriverInfo()))
    series["fork, parent connected once, DriverInfo given"] = forked(client)
    series["warm, in the parent"] = [timings(client, seed) for seed in range(count)]
    names = ("task_first_ms", "task_second_ms", "ping_first_ms", "ping_second_ms", "faults")
    return {
        where: {name: statistics.median(r[i] for r in rows) for i, name in enumerate(names)}
        for where, rows in series.items()
    } | {"n": count}


def run_fork_probe(count: int) -> dict[str, Any]:
    """fork_probe() in a fresh interpreter: this process never forks."""
    command = [sys.executable, "-m", "benchmarks.queues", "--fork-probe", str(count)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, check=True, timeout=300)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def rotations(keys: list[str], rounds: int) -> Iterator[list[str]]:
    """The keys in a different order every round: nobody always goes first."""
    order = list(keys)
    for _ in range(rounds):
        order.append(order.pop(0))
        yield list(order)


def run(args: argparse.Namespace) -> dict[str, Any]:
    connection = redis.Redis.from_url(REDIS_URL)
    connection.flushdb()  # db 7 only
    run_id = uuid.uuid4().hex[:8]
    configs = [BY_KEY[key] for key in args.only] if args.only else list(CONFIGS)
    logdir = Path(tempfile.mkdtemp(prefix="zyb-queues-", dir="/tmp"))
    seeds = itertools.count(1000)
    record: dict[str, Any] = {
        "machine": machine(),
        "preload": preload_versions(),
        "versions": versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.queues", *sys.argv[1:]]),
        "loadavg_before": os.getloadavg(),
        "settings": {
            "rounds": args.rounds,
            "samples": args.samples,
            "n_fast": args.n_fast,
            "n_slow": args.n_slow,
            "pause_ms": PAUSE * 1000,
        },
        "configs": {c.key: {"label": c.label, "fresh": c.fresh} for c in configs},
        "logs": str(logdir),
    }
    began = time.monotonic()
    servers = redis_servers()
    record["fork_probe"] = run_fork_probe(args.samples * 2)  # before any worker runs
    running: dict[str, Workers] = {}
    leftovers: dict[str, list[str]] = {}
    try:
        for config in configs:  # all start at once: the zygotes boot in parallel
            running[config.key] = Workers(config, run_id, logdir)
            running[config.key].start()
        for key, workers in running.items():
            workers.wait_ready(connection)
            warm_up(workers)
            print(f"# {key}: ready and warm", file=sys.stderr)

        batches: dict[str, list[dict[str, Any]]] = {key: [] for key in running}
        for order in rotations(list(running), args.rounds):
            for key in order:
                config = running[key].config
                n = args.n_slow if config.slow else args.n_fast
                batches[key].append(throughput(running[key], n, seeds, servers))
                print(
                    f"# throughput {key}: {batches[key][-1]['tasks_per_s']:.1f}/s", file=sys.stderr
                )

        samples: dict[str, list[dict[str, Any]]] = {key: [] for key in running}
        for order in rotations(list(running), args.samples):
            for key in order:
                samples[key].append(sample(running[key], next(seeds)))
                time.sleep(PAUSE)
        jobs = {key: w.jobs_per_worker() for key, w in running.items()}
    finally:
        for key, workers in running.items():
            leftovers[key] = workers.stop()
        connection.flushdb()
    record.update(
        loadavg_after=os.getloadavg(),
        seconds=time.monotonic() - began,
        throughput=batches,
        samples=samples,
        rq_jobs_per_worker=jobs,
        leftovers=leftovers,
        rows={key: row(BY_KEY[key], batches[key], samples[key]) for key in running},
    )
    return record


def row(
    config: Config, batches: list[dict[str, Any]], samples: list[dict[str, Any]]
) -> dict[str, Any]:
    """A configuration's figures: median throughput, latency percentiles and its split."""
    rates = [b["tasks_per_s"] for b in batches]
    ms = [s["ms"] for s in samples]

    def median(name: str) -> float:
        return float(statistics.median(s[name] for s in samples))

    return {
        "label": config.label,
        "fresh": config.fresh,
        "n": batches[0]["n"],
        "rounds": len(batches),
        "tasks_per_s": statistics.median(rates),
        "tasks_per_s_min": min(rates),
        "tasks_per_s_max": max(rates),
        "processes_per_batch": statistics.median(b["processes"] for b in batches),
        "cpu_busy": statistics.median(b["cpu"]["busy"] for b in batches),
        "cpu_steal": statistics.median(b["cpu"]["steal"] for b in batches),
        "machine_cpu_ms": statistics.median(b["machine_cpu_ms_per_task"] for b in batches),
        "redis_cpu_ms": statistics.median(b["redis_cpu_ms_per_task"] for b in batches),
        "worker_cpu_ms": statistics.median(
            sum(b["worker_cpu_ms_per_task"].values()) for b in batches
        ),
        "worker_cpu_children_ms": statistics.median(
            b["worker_cpu_ms_per_task"]["children"] for b in batches
        ),
        "client_cpu_ms": statistics.median(b["client_cpu_ms_per_task"] for b in batches),
        "samples": len(samples),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "mean": statistics.fmean(ms),
        "to_start_p50": median("to_start_ms"),
        "task_p50": median("task_ms"),
        "from_end_p50": median("from_end_ms"),
        "faults_p50": median("faults"),
        "latency_processes": len({s["pid"] for s in samples}),
    }


def versions() -> dict[str, str]:
    """Libraries, the commit, and a digest of each client file: the queue
    integrations are untracked work in progress, so the commit alone does
    not say which code ran."""
    from importlib.metadata import version

    found = {name: version(name) for name in ("celery", "kombu", "billiard", "rq", "redis")}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
    for path in [*sorted((REPO / "clients").glob("*/*.py")), REPO / "zygote" / "embedded.py"]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        found[str(path.relative_to(REPO))] = digest
    return found


# -- the report ----------------------------------------------------------------


def report(record: dict[str, Any]) -> None:
    rows = record["rows"]
    settings = record["settings"]
    print(f"# {record['machine']}; {record['preload']}")
    v = record["versions"]
    commit = v.get("commit", "?")
    print(f"# celery {v['celery']}, rq {v['rq']}, redis-py {v['redis']}; commit {commit}")
    print(
        f"# {record['date']}; load average before {fmt_load(record['loadavg_before'])}, "
        f"after {fmt_load(record['loadavg_after'])}; took {record['seconds']:.0f} s"
    )
    print()
    print(
        f"Throughput: N tasks enqueued at once, first enqueue -> last result, median of "
        f"{settings['rounds']} rounds (min–max). Latency: one task at a time, "
        f"{settings['samples']} samples each, interleaved, {settings['pause_ms']:.0f} ms pause."
    )
    print()
    print(
        "| configuration | fresh process per task | N | tasks/s | (min–max) "
        "| processes per batch | p50 ms | p90 ms | mean ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows.values():
        print(
            f"| {r['label']} | {'yes' if r['fresh'] else 'no'} | {r['n']} | {r['tasks_per_s']:.1f} "
            f"| {r['tasks_per_s_min']:.1f}–{r['tasks_per_s_max']:.1f} "
            f"| {r['processes_per_batch']:.0f} | {r['p50']:.1f} | {r['p90']:.1f} "
            f"| {r['mean']:.1f} |"
        )
    print()
    cores = os.cpu_count() or 1
    print(
        "CPU during the throughput batches, per task (medians, ms): the whole machine's, the "
        "workers' (in per-task processes: the forks, horses or replaced pool processes), this "
        "process's (enqueue, collect), the Redis server's, and the rest (the kernel's own "
        "threads and interrupts, anyone else's processes); the last column is what the cores "
        "allow at the workers' cost alone."
    )
    print()
    print(
        "| configuration | machine busy | machine | workers | in per-task processes "
        f"| client | Redis | rest | {cores} cores ÷ workers, tasks/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows.values():
        rest = r["machine_cpu_ms"] - r["worker_cpu_ms"] - r["client_cpu_ms"] - r["redis_cpu_ms"]
        print(
            f"| {r['label']} | {r['cpu_busy']:.0%} | {r['machine_cpu_ms']:.1f} "
            f"| {r['worker_cpu_ms']:.1f} | {r['worker_cpu_children_ms']:.1f} "
            f"| {r['client_cpu_ms']:.1f} | {r['redis_cpu_ms']:.1f} | {rest:.1f} "
            f"| {cores * 1000 / max(r['worker_cpu_ms'], 1e-9):.0f} |"
        )
    print()
    print("Where a task's latency goes (medians of the latency samples, ms):")
    print()
    print(
        "| configuration | enqueue → task starts | in the task | task ends → result "
        "| minor faults in the task |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in rows.values():
        print(
            f"| {r['label']} | {r['to_start_p50']:.1f} | {r['task_p50']:.1f} "
            f"| {r['from_end_p50']:.1f} | {r['faults_p50']:.0f} |"
        )
    print()
    probe = record["fork_probe"]
    print(
        f"A fresh fork against a warm process (helper process, n = {probe['n']} each, "
        "medians, ms): the task, twice, then a Redis PING, twice (the first connects)."
    )
    print()
    print("| where | task, 1st | task, 2nd | PING, 1st | PING, 2nd | minor faults, all four |")
    print("| --- | --- | --- | --- | --- | --- |")
    for where, p in probe.items():
        if where != "n":
            print(
                f"| {where} | {p['task_first_ms']:.1f} | {p['task_second_ms']:.1f} "
                f"| {p['ping_first_ms']:.1f} | {p['ping_second_ms']:.2f} | {p['faults']:.0f} |"
            )
    print()
    print("| comparison | throughput | latency p50 | latency mean | target | met? |")
    print("| --- | --- | --- | --- | --- | --- |")
    for zygote, baseline, target in COMPARISONS:
        if zygote not in rows or baseline not in rows:
            continue
        z, b = rows[zygote], rows[baseline]
        speed = z["tasks_per_s"] / b["tasks_per_s"]
        latency, mean = b["p50"] / z["p50"], b["mean"] / z["mean"]
        if target is None:
            goal, met = "—", "—"
        else:
            goal = f"≥ {target:g}×"
            met = f"throughput {yes_no(speed >= target)}, latency {yes_no(latency >= target)}"
        print(
            f"| {z['label']} vs {b['label']} | {speed:.2f}× | {latency:.2f}× | {mean:.2f}× "
            f"| {goal} | {met} |"
        )
    print()
    for key, counts in record["rq_jobs_per_worker"].items():
        if counts:
            print(f"{key}: jobs per worker {counts}")
    for key, lines in record["leftovers"].items():
        for line in lines:
            print(f"LEFTOVER of {key} (killed): {line}")
    print(f"worker logs: {record['logs']}")


def fmt_load(load: tuple[float, float, float] | list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def yes_no(flag: bool) -> str:
    return "**yes**" if flag else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput batches per configuration"
    )
    parser.add_argument(
        "-n", "--samples", type=int, default=25, help="latency samples per configuration"
    )
    parser.add_argument("--n-fast", type=int, default=200, help="tasks per batch")
    parser.add_argument(
        "--n-slow", type=int, default=40, help="tasks per batch, slow configurations"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 round, 8 samples, N 40/10"
    )
    parser.add_argument("--only", nargs="+", choices=list(BY_KEY), help="these configurations only")
    parser.add_argument("--json", type=Path, help="write every figure and sample here")
    parser.add_argument("--fork-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fork_probe:
        print(json.dumps(fork_probe(args.fork_probe)))
        return
    if args.quick:
        args.rounds, args.samples, args.n_fast, args.n_slow = 1, 8, 40, 10
    record = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    report(record)


if __name__ == "__main__":
    main()
