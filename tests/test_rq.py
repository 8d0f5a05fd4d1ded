"""zygote_rq.ZygoteWorker: real `rq worker -w zygote_rq.ZygoteWorker`
processes against the Redis at 127.0.0.1:6379 (database 13, flushed before
and after), with the jobs of tests/rq_app.py preloaded."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from rq import Callback, Queue, Worker
from rq.command import send_kill_horse_command, send_stop_job_command
from rq.job import Job, JobStatus

from tests import rq_app

from .conftest import REPO, Server, is_server, wait_until

REDIS_DB = 13
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
#: Every process a test starts carries this in its environment, and so do
#: the zygote servers the workers start: how leftovers are found.
TAG = "ZYGOTE_RQ_TEST"

DONE = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED)


@pytest.fixture(scope="module")
def connection() -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(REDIS_URL)
    # No Redis is a failure, not a skip: .ci/run starts it.
    conn.ping()
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


@dataclass
class RQWorker:
    process: subprocess.Popen[bytes]
    name: str
    queue: Queue
    tag: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def registered(self) -> Worker | None:
        key = Worker.redis_worker_namespace_prefix + self.name
        return Worker.find_by_key(key, self.queue.connection)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"rq worker exited early:\n{self.log()}")
            worker = self.registered()
            return worker is not None and worker.get_state() == "idle"

        wait_until(ready, timeout=30, what="the rq worker to be idle")

    def stop(self) -> int:
        """A warm shutdown (SIGTERM); SIGKILL if that takes too long."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(5)


#: Every worker the tests started, for their logs and their teardown.
STARTED: list[RQWorker] = []


def new_name() -> str:
    return f"zrq-{uuid.uuid4().hex[:12]}"


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes started by a test with `tag` (zombies are dead)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TAG) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


@pytest.fixture(scope="module")
def start_worker(
    connection: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RQWorker]]:
    """Start `rq worker -w zygote_rq.ZygoteWorker` on a queue of its own."""
    logs = tmp_path_factory.mktemp("rq")

    def start(
        *args: str,
        name: str = "",
        env: dict[str, str] | None = None,
        wait: bool = True,
        worker_class: str = "zygote_rq.ZygoteWorker",
    ) -> RQWorker:
        name = name or new_name()
        tag = uuid.uuid4().hex
        log_path = logs / f"{name}.log"
        base = {k: v for k, v in os.environ.items() if k != "ZYGOTE_ENDPOINT"}
        extra = {"ZYGOTE_PRELOAD": "tests.rq_app", "PYTHONUNBUFFERED": "1", TAG: tag}
        # rq titles its processes with setproctitle when it is installed (the
        # test extra has it): keep their /proc/PID/environ, where TAG is read.
        extra["SPT_NOENV"] = "1"
        command = [sys.executable, "-m", "rq.cli", "worker", "-w", worker_class]
        command += ["-u", REDIS_URL, "-n", name, *args, name]  # its queue has its name
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env={**base, **extra, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = RQWorker(process, name, Queue(name, connection=connection), tag, log_path)
        STARTED.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start

    leftovers = []
    for worker in STARTED:
        worker.stop()
        with contextlib.suppress(AssertionError):
            wait_until(lambda w=worker: not tagged(w.tag), timeout=10)
        for proc in tagged(worker.tag):
            leftovers.append(proc.cmdline())
            with contextlib.suppress(psutil.Error):
                proc.kill()
    STARTED.clear()
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture(scope="module")
def shared(start_worker: Callable[..., RQWorker]) -> RQWorker:
    """One long-lived worker for the tests that leave it working."""
    return start_worker("--with-scheduler", "--job-monitoring-interval", "1")


@pytest.fixture(autouse=True)
def show_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """The logs of the workers a failed test used."""
    before = len(STARTED)
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed:
        return
    used = STARTED[before:]
    if "shared" in request.fixturenames:
        used.insert(0, request.getfixturevalue("shared"))
    for worker in used:
        print(f"--- rq worker {worker.name} ---\n{worker.log()}")


def wait_done(job: Job, timeout: float = 20.0) -> JobStatus:
    return wait_until(
        lambda: job.get_status(refresh=True) in DONE and job.get_status(),
        timeout=timeout,
        what=f"job {job.id} ({job.func_name}) to end",
    )


def exc_string(job: Job) -> str:
    result = job.latest_result()
    assert result is not None
    return result.exc_string or ""


def started_pid(job: Job, timeout: float = 20.0) -> int:
    """The pid a rq_app.sleep_reporting_pid job put in its meta."""

    def reported() -> int | None:
        pid = job.get_meta(refresh=True).get("pid")
        return int(pid) if pid else None

    return int(wait_until(reported, timeout=timeout, what="the job to report its pid"))


# -- a burst worker -------------------------------------------------------


def test_burst_worker_runs_jobs_in_zygote_workers(
    start_worker: Callable[..., RQWorker], connection: redis.Redis
) -> None:
    name = new_name()
    queue = Queue(name, connection=connection)
    added = queue.enqueue(rq_app.add, 2, 3)
    where = queue.enqueue(rq_app.whoami)
    worker = start_worker("--burst", name=name, wait=False)
    assert worker.process.wait(30) == 0, worker.log()

    assert added.get_status(refresh=True) == JobStatus.FINISHED, worker.log()
    assert added.return_value() == 5
    info = where.return_value()
    assert info["ppid"] != worker.process.pid
    # Its module was imported by its parent, the zygote: it was preloaded.
    assert info["imported_in"] == info["ppid"] != info["pid"]
    stats = connection.hgetall(f"rq:worker:{name}")
    assert stats[b"successful_job_count"] == b"2"
    # The worker stopped its zygote server on its way out.
    wait_until(lambda: not tagged(worker.tag), timeout=10, what="the zygote server to stop")


# -- the shared worker ------------------------------------------------------


def test_horse_is_a_child_of_the_workers_zygote(shared: RQWorker) -> None:
    job = shared.queue.enqueue(rq_app.whoami)
    assert wait_done(job) == JobStatus.FINISHED, exc_string(job)
    info = job.return_value()
    assert info["imported_in"] == info["ppid"] != info["pid"]
    # worker -> zygote server (supervisor) -> zygote -> horse
    supervisor = psutil.Process(info["ppid"]).parent()
    assert supervisor is not None and supervisor.ppid() == shared.process.pid


def test_exception_lands_in_failed_registry_with_traceback(shared: RQWorker) -> None:
    job = shared.queue.enqueue(rq_app.fail, "boom")
    assert wait_done(job) == JobStatus.FAILED
    assert job.id in shared.queue.failed_job_registry
    text = exc_string(job)
    assert "Traceback (most recent call last)" in text
    assert "rq_app.py" in text and "ValueError: boom" in text
    wait_until(lambda: "failing with boom" in shared.log(), 10, "the job's print in the log")


def test_callbacks_run(shared: RQWorker, connection: redis.Redis) -> None:
    ok = shared.queue.enqueue(rq_app.add, 2, 3, on_success=Callback(rq_app.on_success))
    bad = shared.queue.enqueue(rq_app.fail, "no", on_failure=Callback(rq_app.on_failure))
    assert wait_done(ok) == JobStatus.FINISHED
    assert wait_done(bad) == JobStatus.FAILED
    calls = {c.decode() for c in connection.lrange(f"{shared.name}:callbacks", 0, -1)}
    assert calls == {f"success {ok.id} 5", f"failure {bad.id} ValueError: no"}
    # In the horse, as with RQ's Worker, though the worker records the success.
    (pid,) = connection.lrange(f"{shared.name}:callback-pids", 0, -1)
    assert int(pid) != shared.process.pid


def test_a_job_that_returns_costs_its_horse_no_redis_connection(
    shared: RQWorker, connection: redis.Redis
) -> None:
    # The worker prepares the job before the spawn and records its result
    # after; only a failure, a callback or the job itself connect.
    before = connection.info("stats")["total_connections_received"]
    jobs = [shared.queue.enqueue(rq_app.add, n, 1) for n in range(6)]
    for n, job in enumerate(jobs):
        assert wait_done(job) == JobStatus.FINISHED, exc_string(job)
        assert job.return_value() == n + 1
    assert connection.info("stats")["total_connections_received"] - before <= 2
    stats = connection.hgetall(f"rq:worker:{shared.name}")
    assert int(stats[b"successful_job_count"]) >= 6


def test_a_return_value_that_cannot_be_pickled_is_replaced_as_rq_does(shared: RQWorker) -> None:
    # The horse pickles it now, the worker stores it: RQ's placeholder, as before.
    job = shared.queue.enqueue(rq_app.unpicklable)
    assert wait_done(job) == JobStatus.FINISHED, exc_string(job)
    assert job.return_value() == "Unserializable return value"


def test_job_timeout_fails_job(shared: RQWorker) -> None:
    job = shared.queue.enqueue(rq_app.sleep, 30, job_timeout=1)
    assert wait_done(job) == JobStatus.FAILED
    assert job.id in shared.queue.failed_job_registry
    assert "JobTimeoutException" in exc_string(job)


def test_stop_job_command_stops_running_job(shared: RQWorker, connection: redis.Redis) -> None:
    job = shared.queue.enqueue(rq_app.sleep_reporting_pid, 30)
    pid = started_pid(job)
    send_stop_job_command(connection, job.id)
    assert wait_done(job) == JobStatus.STOPPED
    assert job.id in shared.queue.failed_job_registry
    assert "stopped" in exc_string(job)
    wait_until(lambda: not psutil.pid_exists(pid), what="the horse to be gone")


def test_killed_horse_fails_job_and_worker_goes_on(
    shared: RQWorker, connection: redis.Redis
) -> None:
    by_command = shared.queue.enqueue(rq_app.sleep_reporting_pid, 30)
    started_pid(by_command)
    send_kill_horse_command(connection, shared.name)
    assert wait_done(by_command) == JobStatus.FAILED
    assert "Work-horse terminated unexpectedly" in exc_string(by_command)

    from_outside = shared.queue.enqueue(rq_app.sleep_reporting_pid, 30)
    os.kill(started_pid(from_outside), signal.SIGKILL)
    assert wait_done(from_outside) == JobStatus.FAILED
    assert "Work-horse terminated unexpectedly" in exc_string(from_outside)
    assert "(signal 9)" in exc_string(from_outside)

    after = shared.queue.enqueue(rq_app.add, 1, 1)
    assert wait_done(after) == JobStatus.FINISHED
    assert after.return_value() == 2


def test_heartbeats_continue_during_a_long_job(shared: RQWorker, connection: redis.Redis) -> None:
    # The worker runs with --job-monitoring-interval 1.
    job = shared.queue.enqueue(rq_app.sleep, 4)
    wait_until(lambda: job.get_status(refresh=True) == JobStatus.STARTED, what="the job to start")
    worker = shared.registered()
    assert worker is not None and worker.get_current_job_id() == job.id
    beats: set[bytes] = set()

    def beating() -> bool:
        beat = connection.hget(f"rq:worker:{shared.name}", "last_heartbeat")
        if beat is not None and job.get_status(refresh=True) == JobStatus.STARTED:
            beats.add(beat)
        return len(beats) >= 3

    wait_until(beating, timeout=15, what="heartbeats while the job runs")
    assert wait_done(job) == JobStatus.FINISHED
    assert shared.process.poll() is None


def test_dead_zygote_server_is_replaced(shared: RQWorker) -> None:
    def servers() -> list[psutil.Process]:
        children = psutil.Process(shared.process.pid).children()
        return [p for p in children if is_server(p.cmdline())]

    def idle() -> bool:
        worker = shared.registered()
        return worker is not None and worker.get_state() == "idle"

    wait_until(idle, what="the worker to be idle")  # not waiting for a horse's exit
    [server] = servers()
    pidfd = os.pidfd_open(server.pid)
    try:
        server.kill()
        # Readable once all its threads are gone: then its parent can reap it.
        assert select.select([pidfd], [], [], 10)[0], "the zygote server did not die"
    finally:
        os.close(pidfd)
    job = shared.queue.enqueue(rq_app.add, 4, 5)
    assert wait_done(job) == JobStatus.FINISHED, exc_string(job)
    assert job.return_value() == 9
    [replacement] = servers()
    assert replacement.pid != server.pid


def test_scheduler_runs_job_enqueued_in(shared: RQWorker) -> None:
    job = shared.queue.enqueue_in(timedelta(seconds=1), rq_app.add, 20, 22)
    assert job.get_status() == JobStatus.SCHEDULED
    assert wait_done(job, timeout=30) == JobStatus.FINISHED
    assert job.return_value() == 42


# -- other servers, other workers -------------------------------------------


def test_zygote_endpoint_server_and_spawn_errors(
    start_worker: Callable[..., RQWorker], start_server: Callable[..., Server]
) -> None:
    server = start_server(
        "--max-workers", "1", "--queue-size", "1", preload=("zygote_rq.horse", "tests.rq_app")
    )
    worker = start_worker(env={"ZYGOTE_ENDPOINT": server.endpoint})
    assert [p.pid for p in tagged(worker.tag)] == [worker.process.pid]  # no server of its own

    job = worker.queue.enqueue(rq_app.whoami)
    assert wait_done(job) == JobStatus.FINISHED, worker.log()
    assert job.return_value()["ppid"] == server.zygote_pid()

    # Fill the server: one job running, one queued; the next spawn is refused.
    running = server.client(timeout=30).spawn("tests.rq_app:sleep", 60)
    queued: list[Any] = []
    waiting = threading.Thread(
        target=lambda: queued.append(server.client(timeout=60).spawn("tests.rq_app:sleep", 60)),
        daemon=True,
    )
    waiting.start()
    wait_until(lambda: server.stats()["queued"] == 1, what="a queued spawn")
    refused = worker.queue.enqueue(rq_app.add, 1, 2)
    assert wait_done(refused) == JobStatus.FAILED
    assert "zygote could not start a work horse: ServerBusy" in exc_string(refused)
    assert refused.id in worker.queue.failed_job_registry

    running.kill(signal.SIGKILL)
    waiting.join(30)
    queued[0].kill(signal.SIGKILL)
    after = worker.queue.enqueue(rq_app.add, 1, 2)
    assert wait_done(after) == JobStatus.FINISHED, worker.log()
    assert after.return_value() == 3
    assert worker.stop() == 0


def test_warm_and_cold_shutdown(start_worker: Callable[..., RQWorker]) -> None:
    warm = start_worker()
    job = warm.queue.enqueue(rq_app.sleep, 0.5)
    wait_until(lambda: job.get_status(refresh=True) == JobStatus.STARTED, what="the job to start")
    warm.process.send_signal(signal.SIGTERM)
    assert warm.process.wait(20) == 0, warm.log()
    assert job.get_status(refresh=True) == JobStatus.FINISHED  # it waited for the job
    wait_until(lambda: not tagged(warm.tag), what="the zygote server to stop")

    cold = start_worker()
    job = cold.queue.enqueue(rq_app.sleep_reporting_pid, 30)
    pid = started_pid(job)
    cold.process.send_signal(signal.SIGTERM)
    time.sleep(1.1)  # not a wait: RQ ignores a second signal within a second of the first
    cold.process.send_signal(signal.SIGTERM)
    cold.process.wait(20)
    assert "cold shut down" in cold.log()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    wait_until(lambda: not tagged(cold.tag), what="the zygote server to stop")


def test_a_horse_gone_before_it_is_followed_is_not_waited_for(shared_client: Any) -> None:
    # Its process was reaped before the worker could open a pidfd on it, and
    # it did not return: no message will ever come for it again, so the
    # wait must end at once, and the exit status come from the server.
    from zygote_rq.process import Horse, returned

    handle = shared_client.spawn("tests.tasks:raise_value_error")
    handle.wait()
    horse = Horse(handle)
    ended = threading.Event()

    def wait() -> None:
        horse.wait_done(shared_client.fileno(), lambda: returned(handle))
        ended.set()

    threading.Thread(target=wait, daemon=True).start()
    assert ended.wait(10), "the wait for a horse already gone did not end"
    horse.close()


def test_held_signals_run_after_the_block_every_one() -> None:
    # How the worker keeps RQ's alarm and shutdown handlers out of the zygote
    # client: they run after the client call, and one that raises (the
    # monitoring alarm) does not swallow the others.
    from zygote_rq.process import held_signals

    class Alarm(Exception):
        pass

    ran: list[str] = []

    def alarm(signum: int, frame: object) -> None:
        ran.append("alarm")
        raise Alarm

    handlers = {signal.SIGALRM: alarm, signal.SIGTERM: lambda *_: ran.append("term")}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        with pytest.raises(Alarm), held_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGALRM)
            ran.append("block")
        ran.append("after")
        assert ran == ["block", "alarm", "term", "after"]
        assert signal.getsignal(signal.SIGALRM) is alarm  # put back
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_horse_module_loads_no_zmq() -> None:
    # The zygote preloads it: ZeroMQ would bring threads into a process that forks.
    code = "import sys, zygote_rq.horse; print(sorted(m for m in sys.modules if 'zmq' in m))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_horse_that_never_runs_the_job_fails_it(
    start_worker: Callable[..., RQWorker], connection: redis.Redis
) -> None:
    # A zygote worker that raised exits with status 0; RQ must not take that
    # for a job done (think of a ZYGOTE_ENDPOINT server without zygote_rq).
    name = new_name()
    job = Queue(name, connection=connection).enqueue(rq_app.add, 1, 2)
    worker = start_worker(
        "--burst", name=name, wait=False, worker_class="tests.rq_app.NoHorseWorker"
    )
    assert worker.process.wait(30) == 0, worker.log()
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert "Work-horse terminated unexpectedly; waitpid returned 256" in exc_string(job)
    assert "no_such_horse" in worker.log()


def test_bad_preload_makes_worker_exit(start_worker: Callable[..., RQWorker]) -> None:
    worker = start_worker("--burst", env={"ZYGOTE_PRELOAD": "tests.no_such_module"}, wait=False)
    assert worker.process.wait(30) != 0
    log = worker.log()
    assert "No module named 'tests.no_such_module'" in log
    assert "embedded zygote server exited" in log
    assert worker.registered() is None


def test_sigkilled_worker_leaves_no_zygote_server(start_worker: Callable[..., RQWorker]) -> None:
    worker = start_worker()
    servers = [p for p in tagged(worker.tag) if p.pid != worker.process.pid]
    assert servers, "no zygote server found"
    worker.process.kill()
    worker.process.wait(10)
    wait_until(lambda: not tagged(worker.tag), timeout=20, what="the zygote server to go")
