"""Every message zygote's processes exchange, as data. The codec that turns
them into bytes and back is `zygote.codec`; neither does any I/O.

Each message is a frozen dataclass with a `KIND`. Anything that does not
decode into a known, well-formed message raises a `ProtocolError` subclass,
which the receiver turns into an error reply (or a logged drop): bad input
never takes a process down.

Four conversations use this module:

* client <-> supervisor, over ZeroMQ: `Spawn`, `Attach`, `Collected`, `Kill`,
  `Stats`, `Jobs`, `Ping`, `Refork`, `Stop` and the replies `Spawned`,
  `Result`, `Exited`, `Output`, `Ok`, `Error`;
* supervisor <-> zygote, over a SOCK_SEQPACKET socket: `Boot`, `Booted`,
  `BootFailed`, `Fork`, `Forked`, `ForkFailed`, `Threads`, `Reaped`,
  `HelperStarted`, `HelperExited`;
* worker <-> supervisor, over the worker's own stream socket, framed by
  `FrameDecoder`: `Ready`, `Phase`, `ValidatorFailed`, `Result` from the
  worker; `Task` or `Go` to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The errors live in their own module; they are part of this one's surface.
from .protocol_errors import (
    ErrorCode,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    UnknownKind,
    UnsupportedVersion,
)
from .protocol_rules import (
    DEFAULT_PROFILE,
    LIMIT_NAMES,
    check_limits,
    check_profile_name,
    check_task_name,
    task_allowed,
)

# Re-exported (mypy): everything else here is defined here.
__all__ = [
    "DEFAULT_PROFILE",
    "LIMIT_NAMES",
    "ErrorCode",
    "MalformedMessage",
    "MessageTooLarge",
    "ProtocolError",
    "UnknownKind",
    "UnsupportedVersion",
    "check_limits",
    "check_profile_name",
    "check_task_name",
    "task_allowed",
]

PROTOCOL_VERSION = 1

#: Default bound on one client message (also the ZeroMQ socket's MAXMSGSIZE
#: slack is derived from it). Big inputs belong in files, not in messages.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_HANDLE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def shutting_down(reason: str) -> str:
    """What a request refused by a stopping server is told."""
    return f"server shutting down: {reason}"


#: What a spawn request costs beyond its variable parts (task, arguments,
#: environment, working directory): msgpack keys, numbers, framing.
SPAWN_OVERHEAD = 1024


def spawn_size(task: str, payload: bytes, env: dict[str, str] | None, cwd: str | None) -> int:
    """An upper bound on the encoded size of a spawn (or of the fork request
    or task carrying it): the client checks it against the server's limit,
    the server against what may travel with a fork request."""
    size = SPAWN_OVERHEAD + len(payload) + len(task.encode()) + len((cwd or "").encode())
    # msgpack spends up to 5 bytes on each string's header.
    return size + sum(len(k.encode()) + len(v.encode()) + 10 for k, v in (env or {}).items())


# Result outcomes.
OK = "ok"  # the task returned; `value` holds it, msgpack-encoded
RAISED = "raised"  # the task raised; exc_type, message, traceback
EXITED = "exited"  # the task called sys.exit(); exit_code
LOST = "lost"  # the worker died without a result; exit_code or signal
TIMEOUT = "timeout"  # the task outlived its timeout and was killed
OUTCOMES = frozenset({OK, RAISED, EXITED, LOST, TIMEOUT})


@dataclass(frozen=True, slots=True)
class Message:
    KIND: ClassVar[str] = ""


# -- client -> supervisor ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn(Message):
    """Run `task` ("package.module:qualname") in a new worker. `payload` is
    ``msgpack.packb([args, kwargs])``: the supervisor passes it through
    without decoding user data.

    `handle`, if given, names the job (the client picks a unique one, like a
    Celery task id): a Spawn whose handle the server already knows is the
    same request sent again and is answered like an `Attach`, so a client
    that lost a reply can ask again without running the task twice."""

    KIND = "spawn"
    req: int
    task: str
    payload: bytes
    timeout: float | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    handle: str | None = None
    #: the zygote lineage (`--profile NAME=...`) to run it in; None: the default
    profile: str | None = None
    #: resource limits for this job (LIMIT_NAMES), lowering the server's
    limits: dict[str, float] | None = None

    def __post_init__(self) -> None:
        check_task_name(self.task)
        check_profile_name(self.profile)
        check_limits(self.limits)
        if self.handle is not None and not _HANDLE_RE.fullmatch(self.handle):
            raise MalformedMessage(f"a handle is 1-64 of [A-Za-z0-9_.-], not {self.handle!r:.80}")
        if self.timeout is not None and not self.timeout > 0:
            raise MalformedMessage(f"timeout must be a positive number, not {self.timeout!r}")


@dataclass(frozen=True, slots=True)
class Attach(Message):
    """Follow an existing handle: the server answers `Spawned` and pushes the
    handle's `Result` and `Exited` to this client when they are known."""

    KIND = "attach"
    req: int
    handle: str


@dataclass(frozen=True, slots=True)
class Collected(Message):
    """These handles' results have reached the client's caller: the server
    may forget them. No reply. Until it arrives a result is kept (see
    `zygote.store`)."""

    KIND = "collected"
    handles: list[str]


@dataclass(frozen=True, slots=True)
class Kill(Message):
    KIND = "kill"
    req: int
    handle: str
    signal: int

    def __post_init__(self) -> None:
        if not 0 < self.signal < 65:
            raise MalformedMessage(f"not a signal number: {self.signal}")


@dataclass(frozen=True, slots=True)
class Stats(Message):
    KIND = "stats"
    req: int


@dataclass(frozen=True, slots=True)
class Jobs(Message):
    """The jobs queued or running (on a CURVE endpoint: the asking key's)."""

    KIND = "jobs"
    req: int


@dataclass(frozen=True, slots=True)
class Ping(Message):
    KIND = "ping"
    req: int


@dataclass(frozen=True, slots=True)
class Refork(Message):
    """Promote a warm worker — one that has just finished a task — to be the
    next zygote generation of `profile` (None: the default one). Answered
    once the new generation serves, or with the reason it could not."""

    KIND = "refork"
    req: int
    profile: str | None = None

    def __post_init__(self) -> None:
        check_profile_name(self.profile)


@dataclass(frozen=True, slots=True)
class Reload(Message):
    """Start the next generation of `profile` (None: of every profile) from a
    fresh interpreter that imports the preload again (new code); answered
    with its number (the default profile's) at once."""

    KIND = "reload"
    req: int
    profile: str | None = None

    def __post_init__(self) -> None:
        check_profile_name(self.profile)


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """Graceful stop: refuse new work, let running workers finish, exit."""

    KIND = "stop"
    req: int


# -- supervisor -> client ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawned(Message):
    KIND = "spawned"
    req: int
    handle: str
    pid: int
    generation: int
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Result(Message):
    """How a task ended. Written by the worker itself (or by the supervisor
    when the worker died without writing it) and forwarded as is."""

    KIND = "result"
    handle: str
    outcome: str
    value: bytes | None = None
    exc_type: str | None = None
    message: str = ""
    traceback: str = ""
    exit_code: int | None = None
    signal: int | None = None
    #: the limit (LIMIT_NAMES) the worker ran into, when that ended it
    limit: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise MalformedMessage(f"unknown outcome {self.outcome!r}")


@dataclass(frozen=True, slots=True)
class Exited(Message):
    """The worker process is gone: its wait status decoded, and rusage."""

    KIND = "exited"
    handle: str
    pid: int
    exit_code: int | None
    signal: int | None
    description: str
    duration: float
    utime: float = 0.0
    stime: float = 0.0
    maxrss_kb: int = 0


@dataclass(frozen=True, slots=True)
class Output(Message):
    """A piece of what a job's task wrote to its stdout or stderr (pushed
    before its `Result`). `offset`: the job's output bytes (both streams)
    before this piece, so that a client drops what it already has."""

    KIND = "output"
    handle: str
    stream: str  # STDOUT or STDERR
    data: bytes
    offset: int = 0


STDOUT, STDERR = "stdout", "stderr"


@dataclass(frozen=True, slots=True)
class Ok(Message):
    KIND = "ok"
    req: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Error(Message):
    KIND = "error"
    req: int
    code: str
    message: str
    reasons: list[str] = field(default_factory=list)


# -- supervisor <-> zygote --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Boot(Message):
    """First message to a new zygote: what to preload and how to serve."""

    KIND = "boot"
    generation: int
    preload: list[str]
    cwd: str
    max_result_bytes: int
    log_level: str = "INFO"
    validators: list[str] = field(default_factory=list)
    disable_validators: list[str] = field(default_factory=list)
    thread_policy: str = "warn"
    allow_threads: list[str] = field(default_factory=list)
    fork_guards: bool = True
    fork_guard_timeout: float = 1.0
    exit_timeout: float = 2.0
    #: tasks clients may run (fnmatch on "module:qualname"); None: any
    allow_tasks: list[str] | None = None
    profile: str = "default"  # its lineage (DEFAULT_PROFILE), for its process title
    log_file: str | None = None  # --log-file: the same place as the supervisor's
    log_format: str = "text"


@dataclass(frozen=True, slots=True)
class Booted(Message):
    KIND = "booted"
    pid: int
    generation: int


@dataclass(frozen=True, slots=True)
class BootFailed(Message):
    KIND = "boot_failed"
    error: str


@dataclass(frozen=True, slots=True)
class Fork(Message):
    """Fork one worker for `handle`. A small task travels along (`task` set)
    so that the child finds it prepared in memory; otherwise the supervisor
    sends a `Task` down the worker's channel after `Forked`."""

    KIND = "fork"
    handle: str
    task: str | None = None
    payload: bytes | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    candidate: bool = False  # see Task.candidate
    limits: dict[str, float] | None = None  # see Task.limits
    #: the zygote writes Go once it has handed the channel over; False: the
    #: supervisor does (after moving the child into its cgroup)
    go: bool = True


@dataclass(frozen=True, slots=True)
class Forked(Message):
    """Sent with two descriptors: the supervisor's end of the worker's
    channel, and a pidfd of the worker."""

    KIND = "forked"
    handle: str
    pid: int
    warnings: list[str] = field(default_factory=list)
    #: seconds the fork waited for threads to leave the fork guards
    guard_wait: float = 0.0
    #: guards it went ahead without (--fork-guard-timeout), with their holders
    guards_missed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ForkFailed(Message):
    KIND = "fork_failed"
    handle: str
    error: str
    #: refused by the thread policy: retrying cannot help
    refused: bool = False


@dataclass(frozen=True, slots=True)
class Threads(Message):
    """The zygote's thread report changed: every kind of thread it has had,
    with how many run now (sent on change, not per fork)."""

    KIND = "threads"
    threads: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Reaped(Message):
    KIND = "reaped"
    pid: int
    status: int
    utime: float
    stime: float
    maxrss_kb: int


@dataclass(frozen=True, slots=True)
class HelperStarted(Message):
    """The zygote forked its helper process (the background functions).
    Sent with one descriptor: an eventfd counting dropped background
    messages."""

    KIND = "helper_started"
    pid: int
    restarts: int


@dataclass(frozen=True, slots=True)
class HelperExited(Message):
    """The helper died; the zygote starts another after a back-off."""

    KIND = "helper_exited"
    pid: int
    status: int


# -- worker <-> supervisor ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready(Message):
    KIND = "ready"


@dataclass(frozen=True, slots=True)
class Phase(Message):
    """The worker is entering a named start-up step (a validator)."""

    KIND = "phase"
    name: str


@dataclass(frozen=True, slots=True)
class ValidatorFailed(Message):
    KIND = "validator_failed"
    name: str
    error: str


@dataclass(frozen=True, slots=True)
class Task(Message):
    KIND = "task"
    handle: str
    task: str
    payload: bytes
    env: dict[str, str] | None = None
    cwd: str | None = None
    #: may be promoted to a zygote once its task succeeds: it waits to hear
    candidate: bool = False
    #: the limits the worker sets on itself (rlimits) before the task
    limits: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Promote(Message):
    """To a refork candidate whose task succeeded, with one descriptor: its
    control socket as the next zygote generation (a Boot follows on it)."""

    KIND = "promote"


@dataclass(frozen=True, slots=True)
class Go(Message):
    """Run the task that came with the fork: the supervisor owns the channel."""

    KIND = "go"


Request = Spawn | Attach | Collected | Kill | Stats | Jobs | Ping | Refork | Reload | Stop
Reply = Spawned | Result | Exited | Output | Ok | Error
Control = (
    Boot
    | Booted
    | BootFailed
    | Fork
    | Forked
    | ForkFailed
    | Threads
    | Reaped
    | HelperStarted
    | HelperExited
)
ChannelMessage = Ready | Phase | ValidatorFailed | Result | Task | Go | Promote
