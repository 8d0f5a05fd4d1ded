"""The supervisor's zygotes: starting them, their control messages, losing
them, and the escalation ladder when their children keep coming out corrupt.

The ladder: a failed start is retried (the spawner's business); after
`corrupt_limit` corrupt children in a row from one zygote, that zygote is
killed and a fresh interpreter replaces it; after `zygote_failure_limit`
zygotes in a row that failed — corrupt, dead, or unable to preload before
giving a single healthy child — the server gives up and stops.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

from ..codec import encode
from ..config import ServerConfig
from ..linux import describe_wait_status
from ..logs import Tagged
from ..protocol import (
    DEFAULT_PROFILE,
    Boot,
    Booted,
    BootFailed,
    Fork,
    Forked,
    ForkFailed,
    HelperExited,
    HelperStarted,
    Reaped,
    Threads,
)
from .children import ZygoteProc, ZygoteState
from .drops import Drops
from .generations import ReforkPolicy
from .loop import EventLoop

log = logging.getLogger("zygote.supervisor")

#: Exit statuses of `zygote start` when the ladder runs out.
EXIT_BOOT, EXIT_UNHEALTHY = 3, 4


class ZygoteEvents(Protocol):
    """What zygotes report, for whoever runs the workers (the spawner)."""

    def forked(self, zygote: ZygoteProc, msg: Forked, fds: list[int]) -> None: ...
    def fork_failed(self, zygote: ZygoteProc, msg: ForkFailed) -> None: ...
    def zygote_ready(self, zygote: ZygoteProc) -> None: ...
    def zygote_gone(self, zygote: ZygoteProc) -> None: ...
    def probe(self, zygote: ZygoteProc) -> None: ...


class ExitStatuses(Protocol):
    """Who records the exit statuses zygotes report (the tracker)."""

    def exit_status(
        self, pid: int, status: int, rusage: tuple[float, float, int], zygote: ZygoteProc
    ) -> bool: ...


#: Starts a zygote process: (generation, lifeline fd, now) -> its handle.
Launcher = Callable[[int, int, float], ZygoteProc]


class Fleet:
    def __init__(
        self,
        config: ServerConfig,
        loop: EventLoop,
        lifeline_fd: int,
        exits: ExitStatuses,
        give_up: Callable[[str, int], None],
        *,
        profile: str = DEFAULT_PROFILE,
        preload: list[str] | None = None,
        launch: Launcher = ZygoteProc.start,
        announce: Callable[[int | None, str | None], None] = lambda generation, error: None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.lifeline_fd = lifeline_fd
        self.exits = exits
        self.give_up = give_up
        self.launch = launch
        self.profile = profile
        self.preload = list(config.preload if preload is None else preload)
        # Other lineages than the default one say which they are, each line.
        self.log = log if profile == DEFAULT_PROFILE else Tagged(log, {"tag": f"[{profile}]"})
        #: (the generation that took over, None) or (None, why it did not)
        self.announce = announce
        self.events: ZygoteEvents  # the spawner, which listens once it is built
        self.policy = ReforkPolicy(config.refork_after, loop.now)
        self.refused: dict[str, int] = {}  # why refork candidates were refused, how often
        self.reload_pending = False  # a reload asked for during a refork
        self.current: ZygoteProc | None = None  # the one that takes fork requests
        self.incoming: ZygoteProc | None = None  # the next generation, until it serves
        self.zygotes: dict[int, ZygoteProc] = {}  # by pid: current and retiring
        self.generation = 0
        self.failed_in_a_row = 0  # zygotes that failed before any healthy child
        self.booted_once = False
        self.accepting = True  # False once the server stops: no more zygotes
        self.restarts = 0
        self.retired_corrupt = 0
        self.drops = Drops(loop)

    def listen(self, events: ZygoteEvents) -> None:
        self.events = events

    @property
    def ready(self) -> ZygoteProc | None:
        zygote = self.current
        return zygote if zygote is not None and zygote.state is ZygoteState.READY else None

    def start(self) -> None:
        """Exec the next generation; it takes fork requests once it has booted.
        If the system refuses (no memory, no processes, no descriptors), that
        counts as a failed zygote, and it is tried again a second later."""
        try:
            self.current = self._launch()
        except OSError as exc:
            self.log.error("cannot start a zygote: %s", exc)
            self.failed_in_a_row += 1
            if self.failed_in_a_row >= self.config.zygote_failure_limit:
                self.give_up(f"cannot start a zygote: {exc}", EXIT_UNHEALTHY)
            elif self.accepting:
                self.loop.later(1.0, self._start_again)

    def _start_again(self) -> None:
        if self.accepting and self.current is None:
            self.start()

    def reload(self) -> int:
        """Start the next generation from a fresh interpreter (the preload
        imported again: new code) while the current one keeps serving.
        Returns its number. During a refork, it follows the refork: a warm
        worker of the old code is not what a reload asks for."""
        if self.incoming is None:
            self.incoming = self._launch()
        elif self.incoming.promoted_from is not None:
            self.reload_pending = True
            return self.generation + 1
        return self.incoming.generation

    def _next_reload(self) -> None:
        if self.reload_pending and self.accepting:
            self.reload_pending = False
            self.incoming = self._launch()

    def refork(self) -> None:
        """Promote the next worker of the current generation that finishes
        its task successfully (see generations.py); the outcome is announced."""
        timeout = self.config.refork_timeout
        self.policy.request(timeout)
        self.loop.later(timeout, self._refork_overdue)
        current = self.current.generation if self.current else "-"
        self.log.info(
            "refork requested: the next worker of generation %s to finish its task "
            "becomes the next generation (waiting up to %gs)",
            current,
            timeout,
        )

    def _refork_overdue(self) -> None:
        if self.policy.expired() and self.incoming is None:
            why = (
                f"no worker finished a task within {self.config.refork_timeout:g}s: "
                "there was no warm worker to promote"
            )
            self.log.warning("refork: %s", why)
            self.announce(None, why)

    def wants_refork(self, zygote: ZygoteProc) -> bool:
        """Should the next worker of `zygote` to finish be a refork candidate?"""
        return (
            zygote is self.current
            and zygote.state is ZygoteState.READY
            and self.incoming is None
            and self.accepting
            and self.policy.due(zygote.spawns)
        )

    def adopt(self, pid: int, pidfd: int, control: socket.socket, parent: ZygoteProc) -> ZygoteProc:
        """A worker of `parent` is being promoted: it is the next generation
        once it has booted and a probe child of it passed the validators."""
        self.generation += 1
        zygote = ZygoteProc(self.generation, pid, pidfd, control, self.loop.now())
        zygote.promoted_from, zygote.profile = parent.generation, self.profile
        self.zygotes[pid] = zygote
        self.incoming = zygote
        self.log.info(
            "refork: worker %d of generation %d becomes generation %d",
            pid,
            parent.generation,
            zygote.generation,
        )
        self._boot(zygote, self.config.validate_timeout)
        return zygote

    def _launch(self) -> ZygoteProc:
        self.generation += 1
        zygote = self.launch(self.generation, self.lifeline_fd, self.loop.now())
        zygote.profile = self.profile
        self.zygotes[zygote.pid] = zygote
        self._boot(zygote, self.config.boot_timeout)
        self.log.info(
            "zygote generation %d starting (pid %d, preload: %s)",
            zygote.generation,
            zygote.pid,
            ", ".join(self.preload) or "nothing",
        )
        return zygote

    def _boot(self, zygote: ZygoteProc, timeout: float) -> None:
        config = self.config
        boot = Boot(
            zygote.generation,
            list(self.preload),
            os.getcwd(),
            config.max_message_bytes,
            config.log_level,
            list(config.validators),
            list(config.disable_validators),
            config.thread_policy,
            list(config.allow_threads),
            config.fork_guards,
            config.fork_guard_timeout or 1.0,
            config.exit_timeout,
            config.task_patterns(self.profile),
            self.profile,
            config.log_file,
            config.log_format,
        )
        zygote.control.send(encode(boot))
        zygote.boot_timer = self.loop.later(timeout, self._boot_overdue, zygote, timeout)
        self.loop.watch(zygote.control.fileno(), lambda: self._on_control(zygote))

    def send_fork(self, zygote: ZygoteProc, request: Fork) -> bool:
        """Send a fork request; False if the zygote cannot take it now."""
        try:
            zygote.control.send(encode(request))
        except BlockingIOError:  # not reading: the fork deadline will tell why
            return False
        except OSError:
            self._gone(zygote, "its control socket broke")
            return False
        return True

    # -- the ladder ---------------------------------------------------------

    def child_healthy(self, zygote: ZygoteProc) -> None:
        zygote.healthy_children += 1
        zygote.corrupt_in_a_row = 0
        self.failed_in_a_row = 0

    def child_corrupt(self, zygote: ZygoteProc) -> None:
        zygote.corrupt_in_a_row += 1
        if zygote.corrupt_in_a_row >= self.config.corrupt_limit and zygote is self.current:
            self.retired_corrupt += 1
            self.kill_zygote(zygote, f"gave {zygote.corrupt_in_a_row} corrupt children in a row")

    def _failed(self, zygote: ZygoteProc, why: str) -> None:
        """Count a zygote that ended without one healthy child; give up at the limit."""
        if zygote.healthy_children:
            return
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= self.config.zygote_failure_limit:
            last = f"; its last child: {zygote.last_failure}" if zygote.last_failure else ""
            self.give_up(
                f"{self.failed_in_a_row} zygotes in a row failed; the last one {why}{last}",
                EXIT_UNHEALTHY,
            )

    def _boot_failed(self, zygote: ZygoteProc, why: str) -> None:
        if not self.booted_once:  # it never worked: a configuration error, say so now
            self.give_up(f"the zygote cannot preload: {why}", EXIT_BOOT)
        self.kill_zygote(zygote, why)

    # -- control messages ---------------------------------------------------

    def _on_control(self, zygote: ZygoteProc) -> None:
        messages, closed = zygote.receive()
        self._handle(zygote, messages)
        # Whatever went wrong in the batch is acted on after all of it was
        # handled: a fork reported later in the same batch still counts, so
        # its job is not run a second time by the zygote's successor.
        if zygote.condemned is not None:
            self.kill_zygote(zygote, zygote.condemned)
        elif closed:
            self._gone(zygote, "it closed its control socket")

    def condemn(self, zygote: ZygoteProc, why: str) -> None:
        """Note that a zygote cannot be trusted; it is killed once the batch of
        messages being handled is done."""
        if zygote.condemned is None:
            zygote.condemned = why

    def _handle(self, zygote: ZygoteProc, messages: list[tuple[Any, list[int]]]) -> None:
        for msg, fds in messages:
            if isinstance(msg, str):  # what was wrong with a message
                for fd in fds:
                    os.close(fd)
                self.condemn(zygote, msg)
                continue
            if isinstance(msg, Forked):
                self.events.forked(zygote, msg, fds)
                continue
            if isinstance(msg, HelperStarted) and fds and zygote.drops_fd is None:
                self.drops.watch(zygote, fds.pop(0))
            for fd in fds:
                os.close(fd)
            if isinstance(msg, Reaped):
                rusage = (msg.utime, msg.stime, msg.maxrss_kb)
                if msg.pid in self.zygotes:  # a worker it forked was promoted
                    self.reaped(msg.pid, msg.status)
                elif not self.exits.exit_status(msg.pid, msg.status, rusage, zygote):
                    words = describe_wait_status(msg.status)
                    self.log.debug("zygote %d reaped process %d (%s)", zygote.pid, msg.pid, words)
            elif isinstance(msg, ForkFailed):
                self.events.fork_failed(zygote, msg)
            elif isinstance(msg, Threads):
                zygote.threads = msg.threads
            elif isinstance(msg, HelperStarted):
                zygote.helper_pid, zygote.helper_restarts = msg.pid, msg.restarts
            elif isinstance(msg, HelperExited):
                zygote.helper_pid = None
            elif isinstance(msg, Booted):
                self._on_booted(zygote)
            elif isinstance(msg, BootFailed) and zygote.promoted_from is not None:
                self._candidate_refused(zygote, msg.error.strip())
            elif isinstance(msg, BootFailed):
                self.log.error(
                    "zygote generation %d failed to preload:\n%s",
                    zygote.generation,
                    msg.error.rstrip(),
                )
                self._boot_failed(zygote, msg.error.strip().splitlines()[-1])

    def _on_booted(self, zygote: ZygoteProc) -> None:
        if zygote.state is not ZygoteState.BOOTING:  # retired while it booted
            return
        if zygote.boot_timer is not None:
            zygote.boot_timer.cancel()
        zygote.state = ZygoteState.READY
        self.booted_once = True
        self.log.info(
            "zygote generation %d ready (pid %d) after %.0f ms",
            zygote.generation,
            zygote.pid,
            (self.loop.now() - zygote.started) * 1000,
        )
        if zygote is self.incoming:
            # It serves once a child of it has passed the validators.
            self.events.probe(zygote)
            return
        self.events.zygote_ready(zygote)

    def probe_passed(self, zygote: ZygoteProc) -> None:
        """The incoming generation gave a healthy child: it takes over new
        spawns and the ready pool; the old one retires (its workers finish)."""
        if zygote is not self.incoming:
            return
        old, self.current, self.incoming = self.current, zygote, None
        if zygote.promoted_from is not None:
            self.policy.succeeded()
        if old is not None:
            self.log.info("generation %d takes over from %d", zygote.generation, old.generation)
            self.retire(old)
        self.events.zygote_ready(zygote)
        if zygote.promoted_from is not None:  # to whoever asked for the refork
            self.announce(zygote.generation, None)
        self._next_reload()

    def _candidate_refused(self, zygote: ZygoteProc, why: str) -> None:
        """A worker chosen for a refork said it cannot be one: said once per
        reason (a policy would hit the same reason again), counted."""
        first = why not in self.refused
        self.refused[why] = self.refused.get(why, 0) + 1
        self.log.log(
            logging.WARNING if first else logging.DEBUG,
            "refork: worker %d cannot become generation %d: %s",
            zygote.pid,
            zygote.generation,
            why,
        )
        zygote.condemned, zygote.repeated = f"the candidate was refused: {why}", not first
        zygote.kill()
        self._gone(zygote, zygote.condemned)

    def _boot_overdue(self, zygote: ZygoteProc, timeout: float) -> None:
        if zygote.state is ZygoteState.BOOTING:
            self._boot_failed(zygote, f"did not boot within {timeout:g}s")

    # -- losing zygotes -------------------------------------------------------

    def kill_zygote(self, zygote: ZygoteProc, why: str) -> None:
        """Kill a zygote that cannot be trusted any more; a new one replaces it."""
        if zygote.state is ZygoteState.DEAD:
            return
        self.log.error(
            "zygote generation %d (pid %d) %s; killing it", zygote.generation, zygote.pid, why
        )
        zygote.kill()
        self._gone(zygote, why)

    def _gone(self, zygote: ZygoteProc, why: str) -> None:
        """The zygote is gone, or as good as gone: let the spawner take back
        what it had not forked, and start its successor."""
        if zygote.state is ZygoteState.DEAD:
            return
        retiring = zygote.state is ZygoteState.RETIRING
        # Dead from here on: what the messages below lead to must not come
        # back here (a candidate's refusal, drained after its Reaped).
        zygote.state = ZygoteState.DEAD
        # Messages still queued (forks done, children reaped) count first.
        if self.loop.watching(zygote.control.fileno()):
            self.loop.unwatch(zygote.control.fileno())
            self._handle(zygote, zygote.receive()[0])
        why = zygote.condemned or why  # the first word of what went wrong stands
        zygote.control.close()
        self.drops.zygote_gone(zygote)
        if zygote.boot_timer is not None:
            zygote.boot_timer.cancel()
        self.events.zygote_gone(zygote)
        if zygote is self.incoming:  # it never served: the old one stays
            self.incoming = None
            promoted = zygote.promoted_from is not None
            current = self.current.generation if self.current else "-"
            what = "refork" if promoted else "reload"
            text = f"{what} to generation {zygote.generation} failed ({why})"
            # A refusal for a reason already reported is not news.
            level = logging.DEBUG if zygote.repeated else logging.ERROR
            self.log.log(level, "%s; generation %s keeps serving", text, current)
            if promoted:
                self.policy.failed()
                self.announce(None, text)  # to whoever asked for the refork
            self._next_reload()
            return
        if retiring:
            return
        self.log.warning(
            "zygote generation %d (pid %d) lost: %s", zygote.generation, zygote.pid, why
        )
        if zygote is self.current:
            self.current = None
            self._failed(zygote, why)
            if self.accepting:
                self.restarts += 1
                self.start()

    def retire(self, zygote: ZygoteProc) -> None:
        """Let a zygote go quietly; its workers keep running."""
        if zygote.state in (ZygoteState.BOOTING, ZygoteState.READY):
            # Half-close: it sees end-of-file and exits, while we keep
            # reading what it still has to say (children it reaped).
            zygote.state = ZygoteState.RETIRING
            zygote.control.shutdown(socket.SHUT_WR)
        if zygote is self.current:
            self.current = None

    def stop(self) -> None:
        """No more zygotes. The current one is retired at once: the fork
        requests it already has are ahead of the end-of-file it will read, so
        it still answers them before it exits."""
        self.accepting = False
        for zygote in (self.incoming, self.current):
            if zygote is not None:
                self.retire(zygote)
        self.incoming = None

    def reaped(self, pid: int, status: int) -> ZygoteProc | None:
        """A child of ours was reaped: if it was a zygote, settle it."""
        zygote = self.zygotes.pop(pid, None)
        if zygote is None:
            return None
        if zygote.process is not None:
            zygote.process.returncode = os.waitstatus_to_exitcode(status)
        zygote.reaped = True  # from now on, nothing signals it: its pid is free
        words = describe_wait_status(status)
        already_lost = zygote.state is ZygoteState.DEAD
        self._gone(zygote, words)  # if not already gone, this settles its children too
        os.close(zygote.pidfd)
        self.log.info("zygote generation %d (pid %d) %s", zygote.generation, pid, words)
        if already_lost:
            # Lost before it was reaped: its children are ours only now (we
            # are the subreaper), so settle them now.
            self.events.zygote_gone(zygote)
        return zygote

    def close(self) -> None:
        """At the end: stop counting drops."""
        self.drops.close(list(self.zygotes.values()))

    def kill_all(self) -> None:
        for zygote in self.zygotes.values():
            zygote.kill()
