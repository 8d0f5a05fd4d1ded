"""zygote_celery.ZygotePool in real `celery worker` processes, against the
machine's Redis (db 6) and RabbitMQ, with tests/celery_app.py."""

from __future__ import annotations

import contextlib
import fractions
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import chord
from celery.exceptions import TaskRevokedError, TimeLimitExceeded, WorkerLostError
from celery.result import AsyncResult

from tests import celery_app
from tests.celery_app import app
from zygote import Zygote

from .conftest import REPO, Server, is_server, wait_until

REDIS = "redis://127.0.0.1:6379/6"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
POOL = "zygote_celery:ZygotePool"
_names = itertools.count()


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    name: str
    queue: str
    log_path: Path  # celery's log (-f)
    out_path: Path  # its stdout and stderr, with the embedded server's log

    def call(self, task: Any, *args: Any, **options: Any) -> AsyncResult:
        return task.apply_async(args, queue=self.queue, **options)

    def log(self) -> str:
        paths = (self.log_path, self.out_path)
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def descendants(self) -> list[psutil.Process]:
        """Its processes, but the embedded server's cgroup watchdog: left
        alone, it kills what the server leaves once the server is gone."""
        with contextlib.suppress(psutil.NoSuchProcess):
            procs = psutil.Process(self.process.pid).children(recursive=True)
            return [p for p in procs if _name(p) != "zygote-watchdog"]
        return []

    def servers(self) -> list[psutil.Process]:
        """Its embedded zygote servers (`python -m zygote start`), alive."""
        found = []
        for proc in self.descendants():
            # A task's fork may end while we look: it is no server anyway.
            with contextlib.suppress(psutil.NoSuchProcess):
                if is_server(proc.cmdline()) and proc.is_running():
                    found.append(proc)
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def launch(
    directory: Path,
    *options: str,
    env: dict[str, str] | None = None,
    pool: bool = True,
    ready: bool = True,
    queue: str = "",
) -> Worker:
    """Start `celery worker` on tests.celery_app with ZygotePool, -c 2."""
    name = f"zt{next(_names)}-{uuid.uuid4().hex[:6]}@localhost"
    queue = queue or f"q-{uuid.uuid4().hex[:10]}"
    log_path, out_path = directory / f"{name}.log", directory / f"{name}.out"
    command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker"]
    if pool:
        command += ["-P", "custom"]
    command += ["-n", name, "-Q", queue, "-c", "2", "-l", "info", "-f", str(log_path)]
    command += ["--without-mingle", "--without-gossip", *options]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZYGOTE_", "CELERY_"))}
    env = {
        **base,
        "CELERY_CUSTOM_WORKER_POOL": POOL,
        "ZYGOTE_PRELOAD": "numpy",
        "ZYGOTE_ALLOW_THREADS": "numpy",  # OpenBLAS's pool: numpy stops it at fork
        **(env or {}),
    }
    with open(out_path, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    worker = Worker(process, name, queue, log_path, out_path)
    if ready:

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{worker.log()}")
            return "ready." in worker.log()

        wait_until(up, timeout=40, what="the celery worker to be ready")
    return worker


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


def end(worker: Worker) -> None:
    # SIGKILL: Celery's own shutdown takes 1.5 s (the shutdown tests have
    # theirs); the embedded server goes too (its parent-death signal).
    leftovers = worker.descendants()
    if worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait(10)
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    print(f"--- celery worker log {worker.name} ---\n{worker.log()}")


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(*options: str, **kwargs: Any) -> Worker:
        workers.append(launch(tmp_path, *options, **kwargs))
        return workers[-1]

    yield start
    for worker in workers:
        end(worker)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One worker, with events on, for the tests that leave it running."""
    redis.Redis.from_url(REDIS).flushdb()
    # Pickled messages accepted (as root, CI's user: C_FORCE_ROOT) and a
    # small message limit, for test_a_task_that_cannot_be_sent_fails_alone.
    env = {"CELERY_TEST_PICKLE": "1", "C_FORCE_ROOT": "1", "ZYGOTE_MAX_MESSAGE_BYTES": "100000"}
    worker = launch(tmp_path_factory.mktemp("celery"), "-E", env=env)
    yield worker
    end(worker)


def result(async_result: AsyncResult, timeout: float = 20) -> Any:
    return async_result.get(timeout=timeout, disable_sync_subtasks=False)


def running_pid(worker: Worker, task_id: str, timeout: float = 20) -> int:
    """The pid of the process running `task_id`, from `celery inspect active`."""

    def active() -> int:
        replies = app.control.inspect([worker.name], timeout=1).active() or {}
        for request in replies.get(worker.name, []):
            if request["id"] == task_id:
                return int(request["worker_pid"])
        return 0

    return int(wait_until(active, timeout=timeout, what=f"task {task_id} to be active"))


# -- one worker for the tests that do not end it ------------------------------


def test_tasks_run_in_fresh_forks_of_a_preloaded_zygote(shared: Worker) -> None:
    worker = shared
    assert result(worker.call(celery_app.add, 2, 3)) == 5
    first, second = result(worker.call(celery_app.whoami)), result(worker.call(celery_app.whoami))
    assert first["pid"] != second["pid"]  # a fresh process per task
    assert first["pid"] not in (worker.process.pid, os.getpid())
    assert first["preloaded"]  # numpy came with the fork: ZYGOTE_PRELOAD
    # Its parent is the zygote, a child of the embedded server, itself a
    # child of the celery worker.
    server = worker.servers()
    assert len(server) == 1 and first["ppid"] in [c.pid for c in server[0].children()]


def test_results_errors_and_limits(shared: Worker) -> None:
    worker = shared
    # An exception comes back with its remote traceback.
    failed = worker.call(celery_app.boom, "bad input")
    with pytest.raises(ValueError, match="bad input"):
        result(failed)
    assert "celery_app.py" in failed.traceback and "in boom" in failed.traceback
    # Hard limit: the worker is killed, the result is TimeLimitExceeded.
    hard = worker.call(celery_app.sleep, 60, time_limit=1)
    with pytest.raises(TimeLimitExceeded):
        result(hard)
    assert "Hard time limit (1s) exceeded" in worker.log()
    # Soft limit: SoftTimeLimitExceeded raised inside the task.
    soft = worker.call(celery_app.soft_limited, 60, soft_time_limit=0.5)
    assert result(soft) == "cleaned up after the soft time limit"
    # A crash: WorkerLostError, and the next task runs as usual.
    crashed = worker.call(celery_app.crash)
    with pytest.raises(WorkerLostError, match=r"exited|status 3"):
        result(crashed)
    # self.retry(): the retried message runs in another fork.
    key = f"flaky-{uuid.uuid4().hex}"
    assert result(worker.call(celery_app.flaky, key)) == 3
    assert result(worker.call(celery_app.add, 1, 1)) == 2


def test_revoke_terminate_inspect_and_events(shared: Worker) -> None:
    worker = shared
    events: list[dict[str, Any]] = []
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        listener = threading.Thread(target=receiver.capture, kwargs={"limit": None})
        listener.start()
        try:
            # Events are broadcast: wait until we hear the worker's heartbeat.
            wait_until(
                lambda: any(e.get("hostname") == worker.name for e in list(events)),
                timeout=15,
                what="the worker's heartbeat event",
            )
            running = worker.call(celery_app.sleep, 60)
            pid = running_pid(worker, running.id)
            assert psutil.Process(pid).is_running() and pid != worker.process.pid
            stats = app.control.inspect([worker.name], timeout=2).stats()[worker.name]
            assert stats["pool"]["implementation"] == "zygote_celery.pool:ZygotePool"
            assert stats["pool"]["max-concurrency"] == 2 and pid in stats["pool"]["processes"]
            app.control.revoke(running.id, terminate=True, signal="SIGKILL")
            with pytest.raises(TaskRevokedError):
                result(running)
            wait_until(lambda: not psutil.pid_exists(pid), what="the revoked task's process to end")
            done = worker.call(celery_app.add, 20, 22)
            assert result(done) == 42

            # Flower's view: the task events the worker sent.
            def kinds() -> set[tuple[str, str]]:
                return {(e["type"], e.get("uuid", "")) for e in list(events)}

            wanted = {
                ("task-started", running.id),
                ("task-revoked", running.id),
                ("task-started", done.id),
                ("task-succeeded", done.id),
            }
            wait_until(lambda: wanted <= kinds(), what=f"task events {wanted}")
        finally:
            receiver.should_stop = True
            listener.join(10)


def test_concurrency_is_the_pools_c(shared: Worker) -> None:
    worker = shared
    started = time.monotonic()
    results = [worker.call(celery_app.sleep, 1.0) for _ in range(4)]
    assert [result(r) for r in results] == [1.0] * 4
    elapsed = time.monotonic() - started
    # -c 2: two at a time, so four 1 s tasks take two rounds, not one or four.
    assert 2.0 <= elapsed < 3.9, elapsed


def test_task_logging_reaches_the_workers_log(shared: Worker) -> None:
    assert result(shared.call(celery_app.shout, "hello from a fork")) == "hello from a fork"
    wait_until(
        lambda: "task says: hello from a fork" in shared.log_path.read_text(),
        what="the task's log line in the worker's log file (-f)",
    )
    text = shared.log_path.read_text()
    assert "tests.celery_app.shout" in text  # celery's task log format
    assert "plain logger says: hello from a fork" in text
    wait_until(lambda: "printed: hello from a fork" in shared.log_path.read_text(), 10)


# -- shutdown -------------------------------------------------------------------


def test_warm_shutdown_waits_for_running_tasks(start_worker: Callable[..., Worker]) -> None:
    worker = start_worker()
    running = worker.call(celery_app.sleep, 2)
    pid = running_pid(worker, running.id)
    server = worker.servers()
    assert worker.stop(signal.SIGTERM) == 0
    assert result(running) == 2  # it finished, and its result was stored
    assert not psutil.pid_exists(pid)
    for proc in server:  # the embedded server went with the worker
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(90)
def test_cold_shutdown_kills_and_acks_late_redelivers(start_worker: Callable[..., Worker]):
    key = f"late-{uuid.uuid4().hex}"
    worker = start_worker()
    late = worker.call(celery_app.late, key)
    pid = running_pid(worker, late.id)
    # Accepted is not enough: kill it only once its first try has counted.
    tries = redis.Redis.from_url(REDIS)
    wait_until(lambda: tries.get(key) == b"1", what="the task's first try to begin")
    started = time.monotonic()
    worker.stop(signal.SIGQUIT)
    assert time.monotonic() - started < 15  # did not wait for the 60 s task
    wait_until(lambda: not psutil.pid_exists(pid), what="the running task to be killed")
    # acks_late: the message was not acknowledged, so another worker gets it.
    again = start_worker(queue=worker.queue)
    assert result(again.call(celery_app.add, 0, 0)) == 0
    assert result(late, timeout=30) == "second try"


# -- other brokers, settings and servers ------------------------------------------


def test_with_rabbitmq(start_worker: Callable[..., Worker]) -> None:
    worker = start_worker("-E", env={"CELERY_BROKER_URL": AMQP})
    with app.connection_for_write(AMQP) as connection:

        def call(task: Any, *args: Any, **options: Any) -> AsyncResult:
            return task.apply_async(args, queue=worker.queue, connection=connection, **options)

        assert result(call(celery_app.add, 2, 2)) == 4
        with pytest.raises(ValueError):
            result(call(celery_app.boom, "over amqp"))
        with pytest.raises(TimeLimitExceeded):
            result(call(celery_app.sleep, 60, time_limit=1))
        assert result(call(celery_app.whoami))["pid"] != worker.process.pid


def test_the_worker_pool_setting(start_worker: Callable[..., Worker]) -> None:
    worker = start_worker(
        pool=False, env={"CELERY_TEST_POOL": POOL, "CELERY_CUSTOM_WORKER_POOL": ""}
    )
    assert "zygote pool: tests.celery_app:app" in worker.log()
    assert result(worker.call(celery_app.add, 3, 4)) == 7


def test_an_existing_server_from_zygote_endpoint(
    start_worker: Callable[..., Worker], start_server: Callable[..., Server]
) -> None:
    server = start_server(
        preload=("tests.celery_app", "zygote_celery.child"),
        env={"ZYGOTE_CELERY_APP": "tests.celery_app:app"},
    )
    worker = start_worker(env={"ZYGOTE_ENDPOINT": server.endpoint})
    assert "external server" in worker.log()
    ran = result(worker.call(celery_app.whoami))
    assert ran["ppid"] == server.stats()["zygote_pid"]
    assert not worker.servers()


def test_a_preload_that_fails_stops_the_worker_with_its_error(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker(env={"ZYGOTE_PRELOAD": "no_such_module_here"}, ready=False)
    assert worker.process.wait(60) != 0
    log = worker.log()
    assert "no_such_module_here" in log and "embedded zygote server exited" in log


def test_refork_promotes_a_worker_that_ran_a_task(start_worker: Callable[..., Worker]) -> None:
    # ZYGOTE_REFORK_AFTER reaches the embedded server: a fork that ran a
    # task becomes the zygote (its before_refork hook closed the task's
    # Redis connection first), and later tasks are forked from it.
    worker = start_worker(env={"ZYGOTE_REFORK_AFTER": "2,1000"})
    ran: set[int] = set()

    def forked_from_a_former_task() -> bool:
        where = result(worker.call(celery_app.whoami))
        promoted = where["ppid"] in ran
        ran.add(where["pid"])
        return promoted

    wait_until(forked_from_a_former_task, timeout=30, what="a task forked from a promoted worker")
    assert result(worker.call(celery_app.add, 5, 5)) == 10
    assert "refused" not in worker.log()


def test_a_dead_embedded_server_is_replaced(start_worker: Callable[..., Worker]) -> None:
    worker = start_worker()
    first = result(worker.call(celery_app.whoami))
    (server,) = worker.servers()
    server.kill()  # its zygote and workers follow it (their lifelines)
    # A zombie until the pool reaps it (its Popen, on the next spawn).
    wait_until(lambda: server.status() == psutil.STATUS_ZOMBIE, what="the server to die")
    # The next task's spawn fails, the pool starts another server and the
    # task runs there; the worker goes on.
    again = result(worker.call(celery_app.whoami), timeout=40)
    assert again["ppid"] != first["ppid"]
    assert "the embedded zygote server exited" in worker.log()
    assert result(worker.call(celery_app.add, 1, 2)) == 3


def test_a_task_that_cannot_be_sent_fails_alone(shared: Worker) -> None:
    # A pickled message's arguments are not JSON; a spawn over the server's
    # message limit is refused. Each fails (or runs) on its own: the worker
    # neither dies nor stalls on an unacknowledged message.
    worker = shared
    pickled = worker.call(celery_app.kind, fractions.Fraction(1, 3), serializer="pickle")
    assert result(pickled) == "Fraction"
    too_big = worker.call(celery_app.shout, "x" * 200_000)
    with pytest.raises(WorkerLostError, match="could not start the task"):
        result(too_big)
    assert result(worker.call(celery_app.add, 2, 2)) == 4
    assert worker.process.poll() is None


def test_a_task_revoked_while_it_waits_for_a_slot_never_runs(shared: Worker) -> None:
    key = f"never-{uuid.uuid4().hex}"
    stats = app.control.inspect([shared.name], timeout=2).stats()[shared.name]
    with Zygote(stats["pool"]["zygote"]["endpoint"], timeout=10) as server:
        accepted = server.stats()["accepted"]
    sleepers = [shared.call(celery_app.sleep, 60) for _ in range(2)]  # -c 2: both slots
    pids = [running_pid(shared, s.id) for s in sleepers]
    waiting = shared.call(celery_app.mark, key)
    app.control.revoke(waiting.id, terminate=True)
    for sleeper in sleepers:
        app.control.revoke(sleeper.id, terminate=True, signal="SIGKILL")
    with pytest.raises(TaskRevokedError):
        result(waiting)
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), what="the sleepers gone")
    assert result(shared.call(celery_app.add, 1, 1)) == 2
    assert redis.Redis.from_url(REDIS).get(key) is None
    with Zygote(stats["pool"]["zygote"]["endpoint"], timeout=10) as server:
        assert server.stats()["accepted"] == accepted + 3  # the sleepers, add: never `mark`


def test_the_pool_stores_what_its_forks_leave_it(shared: Worker) -> None:
    # A fork leaves its task's final state to the pool (results.DeferredWrites):
    # the task's own hooks still see it stored, chords still join, and a
    # result too big to send back is stored by the fork itself.
    seen = redis.Redis.from_url(REDIS)
    done = shared.call(celery_app.reporting)
    assert result(done) == "done"
    assert seen.lrange(f"seen-{done.id}", 0, -1) == [b"on_success:SUCCESS", b"after_return:SUCCESS"]
    parts = [celery_app.add.s(x, y).set(queue=shared.queue) for x, y in ((1, 2), (3, 4))]
    joined = chord(parts)(celery_app.total.s().set(queue=shared.queue))
    assert result(joined) == 10
    # The shared worker's server takes 100,000-byte messages: a fork keeps
    # at most a quarter of that.
    for size in (20_000, 300_000):
        assert result(shared.call(celery_app.text, size)) == "x" * size


def test_deferred_writes_are_kept_until_stored() -> None:
    from zygote_celery.results import DeferredWrites, can_defer, store

    backend = app.backend
    assert can_defer(backend)
    task_id, other = uuid.uuid4().hex, uuid.uuid4().hex
    with DeferredWrites(backend, task_id) as deferred:
        backend.store_result(task_id, 42, "SUCCESS")
        assert backend.get_state(task_id) == "SUCCESS"  # read in the fork: the kept write
        backend.store_result(other, 1, "SUCCESS")  # another task's: first ours, then it
    assert deferred.writes == [] and AsyncResult(task_id, app=app).get(timeout=5) == 42
    with DeferredWrites(backend, task_id) as deferred:
        backend.store_result(task_id, 43, "SUCCESS")
    assert len(deferred.writes) == 1 and AsyncResult(other, app=app).get(timeout=5) == 1
    store(backend, deferred.writes)  # not over a SUCCESS stored already
    backend._cache.clear()
    assert AsyncResult(task_id, app=app).get(timeout=5) == 42
    fresh = uuid.uuid4().hex
    with DeferredWrites(backend, fresh) as deferred:
        backend.store_result(fresh, "late", "SUCCESS")
    assert AsyncResult(fresh, app=app).state == "PENDING"
    store(backend, deferred.writes)
    assert AsyncResult(fresh, app=app).get(timeout=5) == "late"
    assert "_store_result" not in vars(backend)  # the fork's patch is gone
