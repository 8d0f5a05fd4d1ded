"""The supervisor's decisions, without processes: the real fleet, spawner,
pool and tracker, a hand-driven clock, fake zygotes and workers
(tests/fake_processes.py). Retries, deadlines, slot accounting, the
escalation ladder and the generation switch — each in milliseconds."""

from __future__ import annotations

import gc
import signal
import weakref
from collections.abc import Iterator

import msgpack
import pytest

from zygote.codec import decode_reply
from zygote.protocol import (
    Boot,
    BootFailed,
    Exited,
    Go,
    Ready,
    Result,
    Spawn,
    Task,
    ValidatorFailed,
)
from zygote.server.children import Job
from zygote.server.fleet import EXIT_UNHEALTHY
from zygote.server.lifecycle import ChildState, JobState

from .fake_processes import FakeWorker, FakeZygote, Harness


@pytest.fixture
def harness(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    marker = request.node.get_closest_marker("settings")
    h = Harness(monkeypatch, **(marker.kwargs if marker else {}))
    try:
        yield h
        # The loop logs and survives a bug in a handler: here it must not happen.
        assert h.loop.internal_errors == 0
    finally:
        h.close()


def ready_zygote(h: Harness) -> FakeZygote:
    zygote = h.zygote
    zygote.boot()
    h.run()
    assert h.fleet.ready is zygote.proc
    return zygote


def start(h: Harness, zygote: FakeZygote) -> FakeWorker:
    """Fork the next requested child and report it ready."""
    worker = zygote.fork()
    h.run()
    worker.send(Ready())
    h.run()
    return worker


def finish(h: Harness, zygote: FakeZygote, worker: FakeWorker, handle: str) -> None:
    worker.send(Result(handle, "ok", value=msgpack.packb(3)))
    h.run()
    worker.exit()
    zygote.reap(worker, 0)
    h.run()


def candidate_done(h: Harness, zygote: FakeZygote, handle: str) -> FakeWorker:
    """Fork the next requested child (a refork candidate), run it to its result."""
    candidate = zygote.fork()
    assert candidate.request.candidate
    h.run()
    candidate.send(Ready())
    h.run()
    candidate.send(Result(handle, "ok", value=msgpack.packb(3)))
    h.run()
    return candidate


def test_a_job_from_fork_request_to_exit(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    job = h.submit("j1", 1, 2)
    assert job.state is JobState.STARTING and h.spawner.slots.taken == 1
    worker = zygote.fork()
    assert worker.request.task == "tests.tasks:add"  # small: it travels with the fork
    h.run()
    assert job.child is not None and job.child.state is ChildState.STARTING
    worker.send(Ready())
    h.run()
    assert h.clients.events == [("started", "j1", worker.pid, 1)]
    assert job.state is JobState.RUNNING and job.spawn.payload == b""  # delivered: dropped
    finish(h, zygote, worker, "j1")
    assert h.clients.kinds("j1") == ["started", "result", "ended"]
    _, _, result, exited = h.clients.events[-1]
    assert result is None  # the worker's own result stands
    report = decode_reply(exited)
    assert isinstance(report, Exited) and report.exit_code == 0
    assert h.spawner.slots.taken == 0 and not h.spawner.jobs and not h.tracker.children
    _, closed = worker.received()
    assert closed  # the cue to exit, after the result


def test_an_ended_job_is_freed_without_the_cycle_collector(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    gc.disable()
    try:
        job = h.submit("j1", 1, 2)
        worker = start(h, zygote)
        assert job.child is not None
        refs = [weakref.ref(job), weakref.ref(job.child)]
        finish(h, zygote, worker, "j1")
        del job
        assert [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()


def test_a_result_sent_just_before_exit_is_not_reported_lost(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    h.submit("j1")
    worker = start(h, zygote)
    worker.send(Result("j1", "ok", value=msgpack.packb(3)))
    worker.exit()  # both in the same batch of events: the channel is read first
    zygote.reap(worker, 0)
    h.run()
    assert h.clients.kinds("j1") == ["started", "result", "ended"]
    assert h.clients.events[-1][2] is None


def test_a_big_task_goes_down_the_channel(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    h.submit("j1", "x" * 100_000)
    worker = zygote.fork()
    assert worker.request.task is None
    h.run()
    messages, _ = worker.received()
    assert [type(m) for m in messages] == [Task]


@pytest.mark.settings(spawn_retries=1, corrupt_limit=10)
def test_a_corrupt_child_is_replaced_until_the_retries_run_out(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    job = h.submit("j1")
    for attempt in (1, 2):
        worker = zygote.fork()
        h.run()
        child = job.child
        assert child is not None
        pidfd = child.pidfd  # closed (and forgotten) once its exit is handled
        worker.send(ValidatorFailed("flaky", "RuntimeError: broken lock"))
        h.run()
        assert h.kernel.signals(pidfd) == [signal.SIGKILL]
        assert child.state is ChildState.EXITED  # its status is still to come
        zygote.reap(worker, signal.SIGKILL)  # killed: a wait status of 9
        h.run()
        if attempt == 1:
            assert job.state is JobState.STARTING  # forked again at once
    kind, _, code, text, reasons = h.clients.events[-1]
    assert (kind, code) == ("failed", "spawn_failed")
    assert "no healthy worker after 2 attempts" in text and len(reasons) == 2
    assert "flaky failed: RuntimeError: broken lock" in reasons[0]
    assert h.spawner.counts.by_step == {"flaky": 2}
    assert h.spawner.slots.taken == 0 and not h.tracker.children


@pytest.mark.settings(fork_timeout=5.0)
def test_a_fork_request_never_answered_replaces_the_zygote(harness: Harness) -> None:
    h = harness
    first = ready_zygote(h)
    job = h.submit("j1")
    assert first.recv() is not None  # the request, never answered
    h.run(advance=5.0)
    assert h.kernel.signals(first.proc.pidfd) == [signal.SIGKILL]
    assert len(h.zygotes) == 2 and h.fleet.restarts == 1
    assert job.state is JobState.QUEUED and job.attempts == 1
    second = ready_zygote(h)
    worker = second.fork()
    assert worker.request.handle == "j1"
    h.run()
    assert job.state is JobState.STARTING and h.spawner.slots.taken == 1


@pytest.mark.settings(validate_timeout=3.0, spawn_retries=0)
def test_a_child_never_ready_is_killed_at_its_deadline(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    job = h.submit("j1")
    worker = zygote.fork()
    h.run()
    child = job.child
    assert child is not None
    pidfd = child.pidfd
    h.run(advance=2.9)
    assert child.alive and not h.kernel.signals(pidfd)
    h.run(advance=0.2)
    assert h.kernel.signals(pidfd) == [signal.SIGKILL]
    zygote.reap(worker, signal.SIGKILL)
    h.run()
    kind, _, code, text, _ = h.clients.events[-1]
    assert (kind, code) == ("failed", "spawn_failed") and "not ready within 3s" in text


@pytest.mark.settings(max_workers=2)
def test_worker_slots_bound_the_forks_in_flight(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    jobs = [h.submit(f"j{i}") for i in range(5)]
    first, second = zygote.fork(), zygote.fork()
    assert zygote.recv() is None  # no third request: both slots are taken
    assert h.spawner.queued == 3 and h.spawner.slots.taken == 2
    h.run()
    for worker in (first, second):
        worker.send(Ready())
    h.run()
    finish(h, zygote, first, first.request.handle)
    third = zygote.fork()  # the freed slot goes to the next in line
    assert third.request.handle == "j2"
    assert h.spawner.slots.taken == 2 and [j.state for j in jobs[3:]] == [JobState.QUEUED] * 2


@pytest.mark.settings(corrupt_limit=2, zygote_failure_limit=2, spawn_retries=10)
def test_the_escalation_ladder(harness: Harness) -> None:
    h = harness
    h.submit("j1")
    for generation in (1, 2):
        zygote = ready_zygote(h)
        for _ in range(2):  # two children dying before ready: corrupt
            worker = zygote.fork()
            h.run()
            worker.exit()
            zygote.reap(worker, signal.SIGSEGV)
            h.run()
        assert h.kernel.signals(zygote.proc.pidfd) == [signal.SIGKILL], generation
    assert h.fleet.retired_corrupt == 2
    # Two zygotes in a row without a healthy child: the last rung.
    assert len(h.gave_up) == 1 and h.gave_up[0][1] == EXIT_UNHEALTHY
    assert "2 zygotes in a row failed" in h.gave_up[0][0]


@pytest.mark.settings(prefork=1)
def test_a_reload_serves_once_its_probe_child_is_ready(harness: Harness) -> None:
    h = harness
    old = ready_zygote(h)
    pooled = start(h, old)
    assert [c.pid for c in h.spawner.lineages["default"].pool.ready] == [pooled.pid]
    assert h.fleet.reload() == 2
    new = h.zygote
    new.boot()
    h.run()
    assert h.fleet.current is old.proc  # not before a child of it is sound
    probe = start(h, new)
    assert h.fleet.current is new.proc and old.closed()  # retired: end-of-file
    _, closed = pooled.received()
    assert closed  # the old generation's pool child is let go
    assert [c.pid for c in h.spawner.lineages["default"].pool.ready] == [
        probe.pid
    ]  # the probe joins the pool
    job = h.submit("j1")
    assert job.child is not None and job.child.pid == probe.pid
    assert h.clients.events[-1] == ("started", "j1", probe.pid, 2)
    pooled.exit()
    old.reap(pooled, 0)
    h.run()
    assert not [e for e in h.clients.events if e[0] == "failed"]


def test_a_reload_whose_probe_fails_keeps_the_old_generation(harness: Harness) -> None:
    h = harness
    old = ready_zygote(h)
    h.fleet.reload()
    new = h.zygote
    new.boot()
    h.run()
    probe = new.fork()
    h.run()
    probe.send(ValidatorFailed("db", "ConnectionError: refused"))
    h.run()
    new.reap(probe, signal.SIGKILL)
    h.run()
    assert h.kernel.signals(new.proc.pidfd) == [signal.SIGKILL]
    assert h.fleet.current is old.proc and h.fleet.incoming is None
    h.submit("j1")
    assert old.fork().request.handle == "j1"  # the old generation serves on


@pytest.mark.settings(refork_after=[2])
def test_a_refork_promotes_the_next_worker_to_finish(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    for handle in ("j1", "j2"):  # two spawns: the policy is due
        h.submit(handle)
        worker = start(h, zygote)
        assert not worker.request.candidate
        finish(h, zygote, worker, handle)
    h.submit("j3")
    candidate = candidate_done(h, zygote, "j3")  # told to wait after its task
    promoted = h.promoted(candidate)
    assert h.spawner.slots.taken == 0 and not h.tracker.children  # no longer a worker
    ended = decode_reply(h.clients.events[-1][3])
    assert isinstance(ended, Exited) and ended.description == "became zygote generation 2"
    boot = promoted.boot()
    assert boot.generation == 2
    h.run()
    probe = start(h, promoted)
    assert h.fleet.current is promoted.proc and zygote.closed()
    assert h.fleet.policy.reforks == 1
    _, closed = probe.received()
    assert closed  # no pool here (--prefork 0): the probe child is let go
    h.submit("j4")
    assert promoted.fork().request.handle == "j4"  # the new generation forks


def test_a_refused_candidate_leaves_the_old_generation_serving(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    answers: list[tuple[int | None, str | None]] = []
    h.fleet.announce = lambda generation, error: answers.append((generation, error))
    h.fleet.refork()
    h.submit("j1")
    candidate = candidate_done(h, zygote, "j1")  # told to wait after its task
    promoted = h.promoted(candidate)
    assert isinstance(promoted.recv(), Boot)
    promoted.send(BootFailed("a thread was left behind: Python thread 'poller'"))
    h.run()
    assert h.fleet.current is zygote.proc and h.fleet.incoming is None
    assert answers == [
        (
            None,
            "refork to generation 2 failed (the candidate was refused: "
            "a thread was left behind: Python thread 'poller')",
        )
    ]
    assert h.fleet.refused == {"a thread was left behind: Python thread 'poller'": 1}
    h.submit("j2")
    worker = zygote.fork()
    assert not worker.request.candidate  # nobody asks any more


def test_an_on_demand_refork_with_no_task_finishing_gives_up(harness: Harness) -> None:
    h = harness
    ready_zygote(h)
    answers: list[tuple[int | None, str | None]] = []
    h.fleet.announce = lambda generation, error: answers.append((generation, error))
    h.fleet.refork()
    h.run(advance=h.config.refork_timeout)
    assert answers and answers[0][0] is None and "no worker finished a task" in str(answers[0][1])


@pytest.mark.settings(prefork=1)
def test_a_pool_child_dying_idle_is_replaced(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    pooled = start(h, zygote)
    pooled.exit()
    h.run(advance=0.01)
    assert not h.spawner.lineages["default"].pool.ready
    zygote.reap(pooled, signal.SIGKILL)
    h.run(advance=0.01)
    replacement = start(h, zygote)
    assert [c.pid for c in h.spawner.lineages["default"].pool.ready] == [replacement.pid]
    assert h.spawner.slots.taken == 0  # pool children hold no worker slot


def test_a_task_past_its_time_limit_is_stopped(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    job = h.submit("j1", timeout=5.0)
    worker = start(h, zygote)
    assert job.child is not None
    pidfd = job.child.pidfd
    h.run(advance=5.0)
    assert h.kernel.signals(pidfd) == [signal.SIGTERM]
    zygote.reap(worker, signal.SIGTERM)
    h.run()
    _, _, result, _ = h.clients.events[-1]
    lost = decode_reply(result)
    assert isinstance(lost, Result) and lost.outcome == "timeout"
    assert "ran past its 5s timeout" in lost.message


def test_a_stop_fails_the_queue_and_lets_running_jobs_finish(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    h.submit("j1")
    h.submit("j2")
    h.submit("j3")  # queued: max_workers is 2
    first = start(h, zygote)
    h.spawner.stop("test")
    assert h.clients.events[-1][:3] == ("failed", "j3", "shutting_down")
    finish(h, zygote, first, "j1")
    assert h.clients.kinds("j1") == ["started", "result", "ended"]


def test_a_reload_during_a_refork_follows_it(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    h.fleet.refork()
    h.submit("j1")
    candidate = candidate_done(h, zygote, "j1")  # told to wait after its task
    promoted = h.promoted(candidate)
    assert h.fleet.reload() == 3  # after the refork, not instead of it
    assert len(h.zygotes) == 2  # nothing launched yet
    promoted.boot()
    h.run()
    start(h, promoted)
    assert h.fleet.current is promoted.proc
    fresh = h.zygote
    assert len(h.zygotes) == 3 and fresh.proc.generation == 3 and fresh.proc.promoted_from is None


def test_a_failure_read_after_the_exit_status_signals_nobody(harness: Harness) -> None:
    # The zygote's word of the exit is handled first; the child's last
    # message (a failed validator) is read while its exit is handled: its
    # pidfd is closed by then, and its number may be another process's.
    h = harness
    zygote = ready_zygote(h)
    job = h.submit("j1")
    worker = zygote.fork()
    h.run()
    child = job.child
    assert child is not None
    pidfd = child.pidfd
    zygote.reap(worker, 1 << 8)  # exited with code 1
    worker.send(ValidatorFailed("flaky", "RuntimeError: broken lock"))
    h.run()
    assert h.kernel.signals(pidfd) == []
    assert child.state is ChildState.ENDED and h.spawner.slots.taken == 1  # its retry's
    assert zygote.fork().request.handle == "j1"


def test_a_ready_child_still_gets_its_go_when_its_zygote_dies(harness: Harness) -> None:
    # The zygote died between handing over the channel and saying go; the
    # child said ready meanwhile and waits for the order.
    h = harness
    zygote = ready_zygote(h)
    h.submit("j1")
    worker = start(h, zygote)
    zygote.sock.close()  # the zygote is gone
    h.run()
    messages, _ = worker.received()
    assert [type(m) for m in messages] == [Go]


@pytest.mark.settings(max_workers=1)
def test_a_promotion_frees_its_slot_for_the_queue_at_once(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    h.fleet.refork()
    h.submit("j1")
    h.submit("j2")  # queued: one slot
    candidate = candidate_done(h, zygote, "j1")
    h.promoted(candidate)
    # Until the switch the old generation serves: j2 does not wait for it.
    assert zygote.fork().request.handle == "j2"


def test_every_job_started_while_a_refork_is_wanted_is_a_candidate_but_not_with_env(
    harness: Harness,
) -> None:
    h = harness
    zygote = ready_zygote(h)
    h.fleet.refork()
    h.submit("j1")
    payload = msgpack.packb([[], {}])
    h.spawner.submit(Job("j2", Spawn(1, "tests.tasks:env", payload, env={"A": "1"}, handle="j2")))
    h.run()
    first, second = zygote.fork(), zygote.fork()
    assert first.request.candidate  # a long task does not hold the refork up...
    assert not second.request.candidate  # ...and one with its own env is never one


def test_a_reload_does_not_answer_a_refork_request(harness: Harness) -> None:
    h = harness
    ready_zygote(h)
    answers: list[tuple[int | None, str | None]] = []
    h.fleet.announce = lambda generation, error: answers.append((generation, error))
    h.fleet.refork()
    h.fleet.reload()
    new = h.zygote
    new.boot()
    h.run()
    start(h, new)
    assert h.fleet.current is new.proc
    assert answers == [] and h.fleet.policy.requested  # still waiting for a warm worker


@pytest.mark.settings(max_workers=1)
def test_killing_a_queued_job_cancels_it(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    h.submit("j1")
    h.submit("j2")  # queued behind j1
    assert h.spawner.kill("j2", signal.SIGTERM) == 0
    kind, handle, code, text, _ = h.clients.events[-1]
    assert (kind, handle, code) == ("failed", "j2", "spawn_failed")
    assert "killed by a client (SIGTERM) before it was ready" in text
    assert h.spawner.queued == 0 and zygote.fork().request.handle == "j1"
    assert zygote.recv() is None  # j2 is never forked


def test_killing_a_starting_job_does_not_start_it_again(harness: Harness) -> None:
    h = harness
    zygote = ready_zygote(h)
    job = h.submit("j1")
    worker = zygote.fork()
    h.run()
    assert job.child is not None
    pidfd = job.child.pidfd
    assert h.spawner.kill("j1", signal.SIGTERM) == worker.pid
    assert h.kernel.signals(pidfd) == [signal.SIGTERM]
    zygote.reap(worker, signal.SIGTERM)
    h.run()
    assert h.clients.events[-1][:3] == ("failed", "j1", "spawn_failed")
    assert zygote.recv() is None  # not forked again
    assert not h.spawner.counts.by_step and h.fleet.current is zygote.proc
    assert zygote.proc.corrupt_in_a_row == 0  # not the zygote's fault
