"""The state tables: pure logic, no processes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zygote.protocol import Spawn
from zygote.server.children import Child, Job
from zygote.server.generations import ReforkPolicy
from zygote.server.lifecycle import (
    CHILD_MOVES,
    JOB_MOVES,
    SLOT_STATES,
    ChildState,
    JobState,
    Slots,
    StateError,
)


def _job(handle: str = "j1") -> Job:
    return Job(handle, Spawn(1, "m:f", msgpack.packb([[1], {}]), handle=handle))


def _child(slots: Slots, job: Job | None = None) -> Child:
    return Child("c", object(), slots, job)  # type: ignore[arg-type]


@pytest.mark.parametrize("old", list(JobState))
@pytest.mark.parametrize("new", list(JobState))
def test_a_job_moves_only_as_its_table_says(old: JobState, new: JobState) -> None:
    job = _job()
    job.state = old
    if new in JOB_MOVES[old]:
        job.move(new)
        assert job.state is new
    else:
        with pytest.raises(StateError, match=f"{old.value} → {new.value}"):
            job.move(new)
        assert job.state is old


@pytest.mark.parametrize("old", list(ChildState))
@pytest.mark.parametrize("new", list(ChildState))
def test_a_child_moves_only_as_its_table_says(old: ChildState, new: ChildState) -> None:
    child = _child(Slots(10))
    child.state = old
    if new in CHILD_MOVES[old]:
        child.move(new)
        assert child.state is new
    else:
        with pytest.raises(StateError):
            child.move(new)
        assert child.state is old


def test_every_state_is_reachable_and_only_the_ends_are_final() -> None:
    for table, first in ((JOB_MOVES, JobState.QUEUED), (CHILD_MOVES, ChildState.FORKING)):
        seen, todo = {first}, [first]
        while todo:
            for nxt in table[todo.pop()]:  # type: ignore[index]
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen == set(type(first))
    assert not JOB_MOVES[JobState.DONE]
    assert {s for s, moves in CHILD_MOVES.items() if not moves} == {
        ChildState.ENDED,
        ChildState.PROMOTED,
    }


def test_a_job_drops_its_arguments_once_its_worker_has_them() -> None:
    job = _job()
    job.move(JobState.STARTING)
    job.move(JobState.QUEUED)  # a failed start: the next one needs them
    assert job.spawn.payload
    job.move(JobState.RUNNING)
    assert job.spawn.payload == b"" and job.spawn.task == "m:f"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_slots_follow_the_moves_and_cannot_leak(data: st.DataObject) -> None:
    """Random lives of children, some with a job, some taking one from the
    pool: the slot count always equals the children holding a slot, and is
    zero once every child has ended."""
    slots = Slots(1000)
    kids: list[Child] = []
    for _ in range(data.draw(st.integers(1, 30))):
        if not kids or data.draw(st.booleans()):
            kids.append(_child(slots, _job() if data.draw(st.booleans()) else None))
        child = data.draw(st.sampled_from(kids))
        choices = sorted(CHILD_MOVES[child.state], key=lambda s: s.value)
        if not choices:
            continue
        new = data.draw(st.sampled_from(choices))
        if new is ChildState.RUNNING and child.state is ChildState.IDLE and child.job is None:
            child.take(_job())
        else:
            child.move(new)
        held = sum(c.job is not None and c.state in SLOT_STATES for c in kids)
        assert slots.taken == held
    for child in kids:  # end them all, by the shortest way the table allows
        while CHILD_MOVES[child.state]:
            moves = CHILD_MOVES[child.state]
            child.move(ChildState.ENDED if ChildState.ENDED in moves else ChildState.EXITED)
    assert slots.taken == 0


def test_a_refork_request_does_not_wait_for_the_policy_back_off() -> None:
    now = [0.0]
    policy = ReforkPolicy([5], lambda: now[0])
    assert not policy.due(4) and policy.due(5)
    policy.failed()
    assert not policy.due(5)  # backing off...
    policy.request(60.0)
    assert policy.due(0)  # ...but not from a request
    policy.failed()  # the second in a row: 2 s
    now[0] += 1.5
    assert not policy.due(5) and not policy.requested
    now[0] += 1.0
    assert policy.due(5)
