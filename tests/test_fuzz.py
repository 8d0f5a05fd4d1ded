"""Fuzzing a live server's endpoint (issue 12): thousands of frames, most of
them wrong, over real ZeroMQ sockets, while a well-behaved client keeps
spawning.

The frames: arbitrary bytes, msgpack of random shapes, every request kind
well-formed or with one field wrong, missing, extreme or extra, REQ-style
and multi-frame messages, frames near `max_message_bytes` and far past it.
What must hold: the server never dies; every frame it should answer (the
codec's own verdict on the frame says which, and with which `req`) gets
exactly one answer; every spawned job gets its `result` and `exited`; no
`internal` error; `rejected_messages` counts exactly the rejected frames; a
normal spawn works throughout and afterwards; the supervisor's descriptors
and memory come back to where they were, and no zombie is left.

Tasks the fuzzer names are harmless: modules that do not exist, or a few
tasks of tests.tasks. `stop` is only sent at the very end.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from zygote import Zygote
from zygote.codec import decode_reply, decode_request, request_id
from zygote.protocol import (
    Collected,
    Error,
    Exited,
    Ok,
    Output,
    ProtocolError,
    Result,
    Spawn,
    Spawned,
    Stop,
)
from zygote.server.endpoint import MAX_BATCH

from .conftest import Server, at_rest, wait_until

MAX = 65536  # the server's --max-message-bytes: oversize frames stay cheap
#: Past this libzmq drops the message and the connection: no answer.
DROP = 2 * MAX + 65536
BATCH = 50
BATCHES = 104  # 5,200 frames
REFORK_TIMEOUT = 3.0

#: The only existing tasks the fuzzer may name: none can hang, crash or hog.
SAFE_TASKS = (
    "tests.tasks:add",
    "tests.tasks:echo",
    "tests.tasks:identity",
    "tests.tasks:raise_value_error",
    "tests.tasks:exit_with",
    "tests.tasks:not_callable",
    "tests.tasks:no_such_function",
    "tests.tasks:Nested.method",
    "tests.tasks:nap",
    "tests.tasks:nap",
    "tests.tasks:nap",
)
#: Signals a fuzzed `kill` may send to a live worker (no SIGSTOP and the
#: like: a stopped worker would hold its slot until the test ends).
SAFE_SIGNALS = (1, 2, 9, 10, 12, 14, 15, 18, 28, 34, 64)
KINDS = ("spawn", "attach", "collected", "kill", "stats", "ping", "refork", "reload")

# -- strategies ---------------------------------------------------------------
# Built once, at import: strategies made inside a draw are validated anew
# each time, which cost more than the drawing.


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn in proportion to its weight
    (`st.one_of` dedupes a strategy listed twice)."""
    slots = [strategy for weight, strategy in choices for _ in range(weight)]
    index = st.integers(0, len(slots) - 1)

    @st.composite
    def draw_one(draw: st.DrawFn) -> Any:
        return draw(slots[draw(index)])

    return draw_one()


ints = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]),
    st.integers(-(2**63), 2**64 - 1),
)
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.text(max_size=24)
names = st.text("abcXYZ019_.-", min_size=1, max_size=64)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=64), names)
values = st.recursive(
    st.one_of(
        scalars,
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
        st.builds(msgpack.Timestamp, st.integers(0, 2**33), st.integers(0, 999_999_999)),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(texts, st.binary(max_size=8), ints), inner, max_size=4),
    ),
    max_leaves=6,
)
identifiers = st.text("abz_Z09é", min_size=1, max_size=8).filter(lambda s: not s[0].isdigit())
#: Task names that are well-formed and name no module that exists.
missing_tasks = st.builds(
    lambda mod, attr: f"zzfuzz{mod}:{attr}",
    st.lists(identifiers, max_size=3).map(".".join),
    st.lists(identifiers, min_size=1, max_size=2).map(".".join),
)
tasks = st.one_of(st.sampled_from(SAFE_TASKS), missing_tasks, texts)
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=32)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=4,
)
payloads = st.one_of(
    st.builds(
        lambda a, k: msgpack.packb([a, k]),
        st.lists(json_like, max_size=3),
        st.dictionaries(st.sampled_from(["seconds", "x", "text", "a", "b", "zz"]), json_like),
    ),
    st.binary(max_size=64),
)
profiles = st.one_of(st.none(), st.just("default"), names, texts, st.just("x" * 65), st.just(""))
#: A real reload boots a fresh interpreter, a refork waits for a task to end:
#: the default profile only now and then, to keep the run short.
generation_profiles = weighted(
    (30, st.one_of(names, texts, st.just("x" * 65), st.just(""))),
    (1, st.sampled_from([None, "default"])),
)


@dataclass(frozen=True)
class Known:
    """Stands for the handle of a job the fuzzer has seen (the n-th last):
    filled in when the frame is sent, so that generation stays pure."""

    n: int


handles = st.one_of(st.integers(0, 63).map(Known), names, texts)
#: Each request kind's fields, right (mostly) or wrong.
fields = {
    "spawn": st.fixed_dictionaries(
        {"task": tasks, "payload": payloads},
        optional={
            "timeout": st.one_of(st.none(), floats, ints),
            "env": st.one_of(st.none(), st.dictionaries(texts, texts, max_size=3)),
            "cwd": st.one_of(st.none(), st.sampled_from(["/", "/tmp", "/nonexistent"]), texts),
            "handle": st.one_of(st.none(), handles),
            "profile": profiles,
        },
    ),
    "attach": st.fixed_dictionaries({"handle": handles}),
    "kill": st.fixed_dictionaries(
        {"handle": handles, "signal": st.one_of(st.sampled_from(SAFE_SIGNALS), ints)}
    ),
    "collected": st.fixed_dictionaries({"handles": st.lists(handles, max_size=4)}),
    "stats": st.just({}),
    "ping": st.just({}),
    # Without a profile, the default one: present nearly always (see above).
    "refork": st.fixed_dictionaries({"profile": generation_profiles}),
    "reload": st.fixed_dictionaries({"profile": generation_profiles}),
}
kinds = st.sampled_from(("spawn",) * 4 + KINDS)  # spawns, mostly
mutations = st.lists(st.sampled_from(["drop", "wrong", "extra", "v", "kind"]), max_size=2)
key_indexes = st.integers(0, 20)
versions = st.one_of(st.just(1.0), st.just(True), ints, values)
wrong_kinds = st.one_of(st.sampled_from(["result", "ok", "spawned", "stop "]), texts)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request map of any kind, right or wrong in one or more ways."""
    kind = draw(kinds)
    body: dict[str, Any] = {"v": 1, "kind": kind, "req": 0, **draw(fields[kind])}
    for how in draw(mutations) if draw(st.booleans()) else ():
        key = sorted(body)[draw(key_indexes) % len(body)]
        if how == "drop":
            del body[key]
        elif how == "wrong":
            body[key] = draw(values)
        elif how == "extra":
            body[draw(texts)] = draw(values)
        elif how == "v":
            body["v"] = draw(versions)
        else:
            body["kind"] = draw(wrong_kinds)
    return body


@dataclass
class Frame:
    """One message to send: its ZeroMQ frames, and which socket takes it."""

    parts: list[bytes]
    body: dict[str, Any] | None = None  # filled in with a fresh req before sending
    drop: bool = False  # past the limit libzmq enforces: a throwaway socket


def frames() -> st.SearchStrategy[Frame]:
    """Every sort of frame the fuzzer sends."""
    padded = st.builds(
        lambda kind, size, fill: Frame(
            [], {"v": 1, "kind": kind, "req": 0, "pad": fill * size, "task": SAFE_TASKS[2]}
        ),
        st.sampled_from(["ping", "stats", "spawn"]),
        st.integers(MAX - 200, MAX + 2000),
        st.sampled_from([b"x", b"\x00"]),
    )
    big_spawn = st.builds(
        lambda size: Frame(
            [],
            {
                "v": 1,
                "kind": "spawn",
                "req": 0,
                "task": "tests.tasks:identity",
                "payload": msgpack.packb([[b"y" * size], {}]),
            },
        ),
        st.integers(MAX - 300, MAX + 100),
    )
    sorts = {
        "bytes": st.builds(lambda b: Frame([b]), st.binary(max_size=200)),
        "msgpack": st.builds(lambda v: Frame([msgpack.packb(v)]), values),
        "request": st.builds(lambda body: Frame([], body), requests()),
        "req-style": st.builds(lambda body: Frame([b""], body), requests()),
        "frames": st.builds(Frame, st.lists(st.binary(max_size=20), min_size=2, max_size=4)),
        # Past MAX_BATCH: dropped whole, unanswered.
        "too many": st.builds(lambda n: Frame([b"\xc1"] * n), st.integers(MAX_BATCH + 1, 300)),
        "frames+request": st.builds(
            lambda body, extra: Frame([b"", b"x", *extra], body),
            requests(),
            st.lists(st.binary(max_size=8), max_size=2),
        ),
        "padded": padded,
        "big spawn": big_spawn,
        "dropped": st.builds(
            lambda size: Frame([b"\x00" * size], drop=True), st.integers(DROP + 1, DROP + 50_000)
        ),
    }
    # How often each sort comes: mostly requests, right or wrong; a frame
    # libzmq drops (a socket of its own each) one in 200.
    weights = {"request": 100, "req-style": 20, "dropped": 1}
    return weighted(*[(weights.get(name, 10), sorts[name]) for name in sorts])


FRAMES = frames()


def _bodies(parts: list[bytes]) -> list[bytes] | None:
    """The requests a message carries: REQ-style `[b"", body]` (one only),
    else a batch of 1 to MAX_BATCH frames; None: the server drops it
    unanswered."""
    if len(parts) >= 2 and not parts[0]:
        return parts[1:] if len(parts) == 2 else None
    return parts if 1 <= len(parts) <= MAX_BATCH else None


def _replies(parts: list[bytes]) -> list[Any]:
    """The answers and pushes one message brings: one after a REQ-style
    delimiter, else one per frame (the server gathers them per client)."""
    return [decode_reply(part) for part in (parts[1:] if not parts[0] else parts)]


# -- the driver ---------------------------------------------------------------


@dataclass
class Fuzzer:
    """Sends batches of frames and checks what comes back."""

    server: Server
    sock: zmq.Socket[bytes]
    reqs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    sent: int = 0
    rejected: int = 0  # frames the server must count in rejected_messages
    spawned: set[str] = field(default_factory=set)
    results: collections.Counter[str] = field(default_factory=collections.Counter)
    exits: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    outputs: int = 0  # output pieces pushed
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    known: list[str] = field(default_factory=lambda: ["fz-0"])
    valid: collections.Counter[str] = field(default_factory=collections.Counter)

    def _resolve(self, value: Any) -> Any:
        """`value` with each `Known` replaced by a handle seen so far."""
        if isinstance(value, Known):
            return self.known[-1 - value.n % len(self.known)]
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        return value

    @staticmethod
    def _harmless(task: str) -> bool:
        return task in SAFE_TASKS or task.startswith("zzfuzz")

    def run_batch(self, batch: list[Frame]) -> None:
        expected: collections.Counter[int] = collections.Counter()
        for frame in batch:
            if frame.drop:
                self._send_dropped(frame.parts[0])
                continue
            parts = list(frame.parts)
            if frame.body is not None:
                body = dict(frame.body)
                if body.get("req") == 0:
                    body["req"] = next(self.reqs)
                body = self._resolve(body)
                parts.append(msgpack.packb(body))
            if any(self._unsafe(body) for body in _bodies(parts) or []):
                parts = [msgpack.packb({"v": 1, "kind": "ping", "req": next(self.reqs)})]
            for outcome in self._verdicts(parts):
                if outcome is not None:
                    expected[outcome] += 1
            self.sock.send_multipart(parts)
            self.sent += 1
        self._receive(expected)

    def _unsafe(self, data: bytes) -> bool:
        """What must not be sent mid-run: a stop, a spawn of a task that does
        something."""
        try:
            msg = decode_request(data, MAX)
        except ProtocolError:
            return False
        return isinstance(msg, Stop) or (isinstance(msg, Spawn) and not self._harmless(msg.task))

    def _verdicts(self, parts: list[bytes]) -> list[int | None]:
        """What the server must do with a message's frames: for each request
        in it, the req its answer carries (None: it gets none)."""
        bodies = _bodies(parts)
        if bodies is None:
            self.rejected += 1
            return []
        return [self._verdict(body) for body in bodies]

    def _verdict(self, data: bytes) -> int | None:
        try:
            msg = decode_request(data, MAX)
        except ProtocolError:
            self.rejected += 1
            return request_id(data)
        if isinstance(msg, Spawn) and msg.handle:
            self.known.append(msg.handle)
        what = msg.task if isinstance(msg, Spawn) and msg.task in SAFE_TASKS else "missing"
        self.valid[f"spawn {what.split(':')[-1]}" if isinstance(msg, Spawn) else msg.KIND] += 1
        return None if isinstance(msg, Collected) else int(msg.req)

    def _send_dropped(self, data: bytes) -> None:
        """A frame past libzmq's limit, on a socket of its own: libzmq drops
        it with the connection, and nothing answers."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(self.server.endpoint)
        sock.send(data)
        sock.close()
        self.sent += 1

    def _receive(self, expected: collections.Counter[int]) -> None:
        """Take in answers until each expected one is here (a refork's waits
        for its outcome); any answer not expected, or a second one, fails."""
        got: collections.Counter[int] = collections.Counter()
        deadline = time.monotonic() + REFORK_TIMEOUT + 20
        while got != expected:
            left = deadline - time.monotonic()
            assert left > 0, f"unanswered: {expected - got}; server alive: {self.alive()}"
            if not self.sock.poll(min(left, 1.0) * 1000):
                assert self.alive(), "the server died"
                continue
            for msg in _replies(self.sock.recv_multipart()):
                if isinstance(msg, Spawned | Ok | Error):
                    got[msg.req] += 1
                    assert got[msg.req] <= expected[msg.req], f"an answer too many: {msg}"
                self._take(msg)
        self._drain()

    def _drain(self) -> None:
        while self.sock.poll(0):
            for msg in _replies(self.sock.recv_multipart()):
                self._take(msg)

    def _take(self, msg: Any) -> None:
        if isinstance(msg, Error):
            self.codes[msg.code] += 1
            assert msg.code != "internal", msg
        elif isinstance(msg, Spawned):
            self.spawned.add(msg.handle)
            self.known.append(msg.handle)
        elif isinstance(msg, Result):
            self.results[msg.handle] += 1
            self.outcomes[msg.outcome] += 1
        elif isinstance(msg, Exited):
            self.exits[msg.handle] += 1
        elif isinstance(msg, Output):  # a task that prints (sys.exit([None]) does)
            self.outputs += 1
        else:
            assert isinstance(msg, Ok), msg

    def alive(self) -> bool:
        return self.server.process.poll() is None

    def settle(self, timeout: float = 30.0) -> None:
        """Wait for every spawned job's result and exit, then collect them."""

        def settled() -> bool:
            self._drain()
            assert self.alive(), "the server died"
            return all(self.results[h] and self.exits[h] for h in self.spawned)

        wait_until(settled, timeout, "every spawned job's result and exit")
        handles = list(self.spawned)
        for start in range(0, len(handles), 500):
            chunk = handles[start : start + 500]
            self.sock.send(msgpack.packb({"v": 1, "kind": "collected", "handles": chunk}))


def _supervisor_resources(pid: int) -> tuple[int, int]:
    proc = psutil.Process(pid)
    return proc.num_fds(), proc.memory_info().rss


def _zombies(pid: int) -> list[int]:
    zombies = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
    return zombies


class Steady:
    """A well-behaved client spawning in a loop on its own thread."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.done = threading.Event()
        self.ok = 0
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Zygote(self.endpoint, timeout=30) as client:
            for n in itertools.count():
                if self.done.is_set():
                    return
                try:
                    assert client.spawn("tests.tasks:add", n, 1).result(timeout=30) == n + 1
                    self.ok += 1
                except BaseException as exc:
                    self.failures.append(exc)
                    return
                self.done.wait(0.02)

    def __enter__(self) -> Steady:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(60)


@pytest.mark.timeout(180)
def test_fuzzed_frames_never_hurt_a_live_server(start_server: Callable[..., Server]) -> None:
    server = start_server(
        "--max-workers",
        "4",
        "--max-message-bytes",
        str(MAX),
        "--refork-timeout",
        str(REFORK_TIMEOUT),
    )
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"zfuzz")
    sock.connect(server.endpoint)
    fuzzer = Fuzzer(server, sock)
    started = time.monotonic()
    try:
        with Zygote(server.endpoint, timeout=20) as client:
            assert client.spawn("tests.tasks:add", 1, 1).result() == 2
            stats_before = at_rest(client)
        # Counted at rest, a full ready pool and no worker: each pool child
        # or worker holds four of the supervisor's descriptors (CI saw a
        # baseline of 22 taken mid-refill against 26-29 at rest).
        fds_before, rss_before = _supervisor_resources(server.pid)

        @settings(
            max_examples=BATCHES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],  # shrinking against a live server means little
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def fuzz(data: st.DataObject) -> None:
            fuzzer.run_batch([data.draw(FRAMES) for _ in range(BATCH)])

        with Steady(server.endpoint) as steady:
            fuzz()
        assert not steady.failures, steady.failures
        assert steady.ok > 0
        fuzzer.settle()

        with Zygote(server.endpoint, timeout=20) as client:
            assert client.spawn("tests.tasks:add", 2, 3).result() == 5

            stats = at_rest(client)
        elapsed = time.monotonic() - started
        rejected = stats["rejected_messages"] - stats_before["rejected_messages"]
        assert stats["internal_errors"] == 0
        assert rejected == fuzzer.rejected, (rejected, fuzzer.rejected)
        assert fuzzer.sent >= 5000
        assert set(fuzzer.spawned) <= set(fuzzer.results)

        seen: list[tuple[int, int]] = []

        def resources_back() -> bool:
            fds, rss = _supervisor_resources(server.pid)
            seen.append((fds, rss))
            return fds <= fds_before + 8 and rss <= rss_before + 40 * 2**20

        try:
            wait_until(resources_back, 10, "fds and RSS back")
        finally:
            (fds, rss) = seen[-1]
            print(f"supervisor fds {fds_before} -> {fds}, RSS {rss_before} -> {rss}")
        wait_until(lambda: not _zombies(server.pid), 10, "no zombie under the supervisor")
        print(
            f"fuzz: {fuzzer.sent} frames in {elapsed:.1f}s, {len(fuzzer.spawned)} jobs spawned, "
            f"outcomes {dict(fuzzer.outcomes)}, errors {dict(fuzzer.codes)}, "
            f"rejected {rejected}, valid {dict(fuzzer.valid)}, steady spawns {steady.ok}, "
            f"generation {stats['generation']}, "
            f"fds {fds_before}->{_supervisor_resources(server.pid)[0]}"
        )
        # Last of all, a stop: the server must wind down cleanly.
        sock.send(msgpack.packb({"v": 1, "kind": "stop", "req": 1}))
        assert server.wait_exit(30) == 0
    finally:
        sock.close()


def test_the_fuzzer_never_names_a_dangerous_task() -> None:
    fuzzer = Fuzzer(cast(Server, None), cast("zmq.Socket[bytes]", None))
    body = {"v": 1, "kind": "spawn", "req": 3, "task": "os:abort", "payload": b""}
    assert fuzzer._unsafe(msgpack.packb(body))
    assert not fuzzer._unsafe(msgpack.packb({**body, "task": "zzfuzz.x:y"}))
    assert fuzzer._verdicts([msgpack.packb({**body, "task": "zzfuzz.x:y"})]) == [3]
    assert fuzzer._unsafe(msgpack.packb({"v": 1, "kind": "stop", "req": 4}))
    assert signal.SIGSTOP not in SAFE_SIGNALS
