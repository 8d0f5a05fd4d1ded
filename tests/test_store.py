"""The supervisor's result store and timers: pure logic with a fake clock."""

from __future__ import annotations

from zygote.server.store import ResultStore
from zygote.server.timers import Timers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_record_leaves_once_result_collected_and_process_ended() -> None:
    store = ResultStore(ttl=10, max_kept=5, clock=Clock())
    record = store.open("h1", "t:f", (b"client",), 1)
    record.result, record.collected = b"r", True
    assert store.settle(record) == [] and store.get("h1") is record
    record.exited = b"e"
    store.settle(record)
    assert store.get("h1") is None and len(store) == 0


def test_uncollected_results_expire_after_ttl() -> None:
    clock = Clock()
    store = ResultStore(ttl=10, max_kept=5, clock=clock)
    record = store.open("h1", "t:f", (b"c",), 1)
    record.result = b"r"
    store.settle(record)
    clock.now += 9
    assert store.expire() == [] and store.uncollected == 1
    clock.now += 2
    assert store.expire() == [record]
    assert store.get("h1") is None


def test_oldest_uncollected_dropped_past_the_bound() -> None:
    store = ResultStore(ttl=10, max_kept=2, clock=Clock())
    records = []
    for i in range(3):
        record = store.open(f"h{i}", "t:f", (b"c",), i)
        record.result = b"r"
        records.append(record)
    assert store.settle(records[0]) == []
    assert store.settle(records[1]) == []
    assert store.settle(records[2]) == [records[0]]
    assert store.get("h0") is None and store.get("h2") is records[2]


def test_oldest_uncollected_dropped_past_the_byte_bound() -> None:
    store = ResultStore(ttl=10, max_kept=100, max_bytes=10, clock=Clock())
    records = []
    for i, size in enumerate((4, 4, 4, 30)):
        record = store.open(f"h{i}", "t:f", (b"c",), i)
        record.result = b"r" * size
        records.append(record)
    assert store.settle(records[0]) == [] and store.settle(records[1]) == []
    assert store.settle(records[2]) == [records[0]]  # 12 bytes > 10
    assert store.uncollected_bytes == 8
    records[1].collected = True
    store.settle(records[1])
    assert store.uncollected_bytes == 4
    # Alone over the bound, the newest still stays: it gets its chance.
    assert store.settle(records[3]) == [records[2]]
    assert store.uncollected == 1 and store.uncollected_bytes == 30


def test_a_dropped_record_is_not_filed_again() -> None:
    # Its result found no client, so it was dropped at the bound; its exit
    # report arrives later and must not bring it back (or expire() crashes).
    clock = Clock()
    store = ResultStore(ttl=10, max_kept=1, clock=clock)
    first, second = (store.open(h, "t:f", (b"c",), 1) for h in ("h1", "h2"))
    for record in (first, second):
        record.result = b"r"
        store.settle(record)
    assert store.get("h1") is None
    first.exited = b"e"
    assert store.settle(first) == []
    clock.now += 11
    assert store.expire() == [second]
    assert len(store) == 0


def test_collected_result_awaiting_its_exit_is_not_owed() -> None:
    store = ResultStore(ttl=1, max_kept=1, clock=Clock())
    record = store.open("h1", "t:f", (b"c",), 1)
    record.result, record.collected = b"r", True
    store.settle(record)
    assert store.uncollected == 0 and store.get("h1") is record


def test_a_sent_result_is_kept_until_collected() -> None:
    # The send to a client that was closing at that moment succeeds and is
    # then thrown away by ZeroMQ: only the client's confirmation counts.
    clock = Clock()
    store = ResultStore(ttl=10, max_kept=5, clock=clock)
    record = store.open("h1", "t:f", (b"c",), 1)
    record.result, record.result_sent = b"r", True
    store.settle(record)
    record.exited, record.exit_sent = b"e", True
    store.settle(record)
    assert store.uncollected == 1 and store.get("h1") is record
    clock.now += 5
    record.collected = True
    store.settle(record)
    assert store.uncollected == 0 and len(store) == 0


def test_the_ttl_counts_from_the_result_not_the_exit() -> None:
    clock = Clock()
    store = ResultStore(ttl=10, max_kept=5, clock=clock)
    record = store.open("h1", "t:f", (b"c",), 1)
    record.result = b"r"
    store.settle(record)
    clock.now += 8
    record.exited = b"e"
    store.settle(record)
    clock.now += 3
    assert store.expire() == [record]


def test_how_a_record_ended_is_remembered_after_it_is_gone() -> None:
    clock = Clock()
    store = ResultStore(ttl=10, max_kept=1, clock=clock)
    collected, dropped, expired, running = (
        store.open(h, "t:f", (b"c",), 1) for h in ("h1", "h2", "h3", "h4")
    )
    collected.result, collected.collected, collected.exited = b"r", True, b"e"
    store.settle(collected)
    for record in (dropped, expired):
        record.result = b"r"
        store.settle(record)
    clock.now += 11
    store.expire()
    store.discard("h5", "never opened")  # nothing to remember
    assert store.ended("h1") == "its result was collected"
    assert "too many kept" in (store.ended("h2") or "")
    assert "expired" in (store.ended("h3") or "")
    assert store.ended("h4") is None and store.get("h4") is running
    assert store.ended("h5") is None


def test_running_jobs_are_never_dropped() -> None:
    store = ResultStore(ttl=1, max_kept=1, clock=Clock())
    running = [store.open(f"h{i}", "t:f", (b"c",), i) for i in range(5)]
    for record in running:
        assert store.settle(record) == []
    assert store.expire() == [] and len(store) == 5


def test_timers_fire_in_order_and_cancel() -> None:
    clock = Clock()
    timers = Timers(clock)
    fired = []
    timers.add(2, fired.append, "b")
    first = timers.add(1, fired.append, "a")
    cancelled = timers.add(1.5, fired.append, "x")
    cancelled.cancel()
    assert timers.next_delay() == 1
    clock.now += 1.6
    timers.run_due()
    assert fired == ["a"] and first.cancelled
    assert timers.next_delay() == 0.4 or abs(timers.next_delay() - 0.4) < 1e-9
    clock.now += 1
    timers.run_due()
    assert fired == ["a", "b"] and timers.next_delay() is None


def test_event_loop_survives_a_failing_handler(caplog) -> None:
    import socket

    from zygote.server.loop import EventLoop

    loop = EventLoop()
    a, b = socket.socketpair()
    calls = []

    def broken() -> None:
        a.recv(10)
        calls.append("broken")
        raise ValueError("a bug")

    loop.watch(a.fileno(), broken)
    loop.later(0, calls.append, "timer")
    b.send(b"x")
    loop.run_once(1.0)
    assert calls == ["broken", "timer"]
    assert loop.internal_errors == 1
    assert (
        "internal error in test_event_loop_survives_a_failing_handler.<locals>.broken"
        in caplog.text
    )
    a.close()
    b.close()
