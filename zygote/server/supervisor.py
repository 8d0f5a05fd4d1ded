"""The supervisor: owns the endpoint, the zygotes and every worker.

One thread, one loop (`run`): wait for anything — a client message, a
zygote or worker event, a signal, a deadline — handle it, repeat. Signal
handlers only enqueue. This module is the clients' side: requests, replies,
results kept until a client confirms them, stopping. Zygotes are the
fleet's business (`fleet.py`), jobs and workers the spawner's (`spawner.py`). The supervisor
never imports user code and never forks the application: zygotes are fresh
interpreters, workers are their forks.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import secrets
import signal
import socket
import time
from typing import Any

import zmq

from .. import __version__
from ..codec import decode_request, encode, request_id
from ..config import ServerConfig
from ..linux import (
    describe_wait_status,
    raise_open_files_limit,
    set_child_subreaper,
    signal_name,
)
from ..protocol import (
    DEFAULT_PROFILE,
    Attach,
    Collected,
    Error,
    ErrorCode,
    Jobs,
    Kill,
    Message,
    Ok,
    Ping,
    ProtocolError,
    Refork,
    Reload,
    Spawn,
    Spawned,
    Stats,
    Stop,
    shutting_down,
    task_allowed,
)
from . import endpoint, metrics, report
from .auth import not_allowed
from .children import Job, ZygoteProc
from .cleanup import make_cleanup
from .fleet import EXIT_BOOT, EXIT_UNHEALTHY, Fleet
from .generation_requests import GenerationRequests
from .loop import EventLoop
from .memory import MemoryReader
from .output import OutputHub
from .report import job_list
from .service import Service
from .spawner import Spawner
from .store import Envelope, Record, ResultStore
from .tracker import Tracker

log = logging.getLogger("zygote.supervisor")

#: Exit statuses of `zygote start`.
EXIT_OK, EXIT_CONFIG = 0, 2
__all__ = ["EXIT_BOOT", "EXIT_CONFIG", "EXIT_OK", "EXIT_UNHEALTHY", "Supervisor"]
_HOUSEKEEPING = 1.0
_S = signal.Signals
_HANDLED_SIGNALS = (_S.SIGTERM, _S.SIGINT, _S.SIGQUIT, _S.SIGCHLD, _S.SIGHUP, _S.SIGUSR2)


class Supervisor:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server_id = secrets.token_hex(4)
        self.started = time.monotonic()
        self.service = Service(config)  # first: it may refuse to start (pidfile)
        self.loop = EventLoop()
        self.store = ResultStore(config.result_ttl, config.max_results, config.max_results_bytes)
        # Workers hold the read end of this pipe; its write end, only we.
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.credentials = config.credentials()
        if self.credentials is not None:  # the zygote re-opens it for each child
            os.fchown(self.lifeline_r, self.credentials[0], self.credentials[1])
        self.cleanup = make_cleanup(config, self.server_id, self._census)
        # Workers' stdout and stderr go out at once, not at the end of the
        # turn: a piece no follower could take is logged instead (send_now
        # says so; a queued send cannot. Pieces are not read while a client's
        # batch is, the only time send_now queues).
        self.output = OutputHub(self._any_record, lambda to, data: self.outgoing.send_now(to, data))
        self.tracker = Tracker(config, self.loop, cleanup=self.cleanup, output=self.output)
        # One lineage of zygotes per profile, the default one (--preload) first.
        self.fleets: dict[str, Fleet] = {}
        self.generation_requests = GenerationRequests(self.fleets, self._send)
        self.fleets.update(
            (
                name,
                Fleet(
                    config,
                    self.loop,
                    self.lifeline_r,
                    self.tracker,
                    self.give_up,
                    profile=name,
                    preload=preload,
                    launch=self._launch_zygote,
                    announce=functools.partial(self.generation_requests.switched, name),
                ),
            )
            for name, preload in config.lineages().items()
        )
        self.outcomes = metrics.JobOutcomes(self, self.loop.now)  # counted on their way to us
        self.spawner = Spawner(
            config, self.loop, self.fleets, self.tracker, self.outcomes, self.cleanup
        )
        self.signals: collections.deque[int] = collections.deque()
        self.stopping: str | None = None
        self.exit_code = EXIT_OK
        self.busy_rejections = 0
        self.listener = endpoint.Listener(config, endpoint.Rejections(self.loop.now))
        # Per profile, once: a spawn only matches against them.
        self._task_patterns = {name: config.task_patterns(name) for name in self.fleets}
        # The records of jobs not yet ended, by handle, whether the store
        # still keeps them or not: written only by the spawner's reports.
        self._unfinished: dict[str, Record] = {}

    # -- lifecycle --------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        self._setup()
        try:
            self.loop.later(_HOUSEKEEPING, self._housekeeping)
            while not (self.stopping and not self.spawner.jobs and not self.tracker.children):
                self.loop.run_once(_HOUSEKEEPING)
                self.service.update(self.fleets, self.stopping)
        finally:
            self._teardown()
        return self.exit_code

    def _launch_zygote(self, generation: int, lifeline: int, now: float) -> ZygoteProc:
        zygote = ZygoteProc.start(generation, lifeline, now, self.credentials)
        self.cleanup.zygote_started(zygote.pid)  # before it runs anything of the app's
        return zygote

    def _census(self) -> tuple[set[int], set[int]]:
        """(our children that are ours to keep, workers running a job)."""
        zygotes = {pid for fleet in self.fleets.values() for pid in fleet.zygotes}
        children = self.tracker.children
        running = {pid for pid, child in children.items() if child.job is not None}
        return zygotes | children.keys(), running

    def _setup(self) -> None:
        set_child_subreaper()
        if (files := raise_open_files_limit()) < 4 * (workers := self.config.max_workers) + 64:
            log.warning("open files limit %d is low for %d workers (ulimit -n)", files, workers)
        self.cleanup.start(self.loop)
        self.context = zmq.Context(io_threads=1)
        self.router = self.listener.open(self.context, self.loop)
        self.outgoing = self.listener.outgoing
        self.loop.after_each_turn(self.outgoing.flush)
        self.endpoint = self.listener.address
        self.metrics = metrics.serve(self.config.metrics, self.loop, self.outcomes, self.spawner)
        self.memory = MemoryReader.started(self.loop.now)  # stats(): RSS, PSS, USS
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in _HANDLED_SIGNALS:
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        self.loop.watch(self.router, self._on_client_messages)
        self.loop.watch(self._wake_r.fileno(), self._on_signals)
        log.info("zygote %s listening on %s (pid %d)", __version__, self.endpoint, os.getpid())
        self.service.listening()
        for fleet in self.fleets.values():
            fleet.start()

    def _teardown(self) -> None:
        fleets = self.fleets.values()
        for fleet in fleets:
            for zygote in list(fleet.zygotes.values()):
                fleet.retire(zygote)
        deadline = time.monotonic() + 5.0
        while any(fleet.zygotes for fleet in fleets) and time.monotonic() < deadline:
            self.loop.run_once(0.05)
        for fleet in fleets:
            fleet.kill_all()
            fleet.close()
        # Whatever tasks left running (daemons, children), and the zygotes.
        self.cleanup.stop()
        deadline = time.monotonic() + 2.0
        while not self.cleanup.finished() and time.monotonic() < deadline:
            time.sleep(0.01)
            self._reap()
        self.outgoing.flush()  # the last replies (a pending refork's, say)
        self.listener.close()
        self.context.term()
        self.listener.remove()
        os.close(self.lifeline_w)
        level = logging.INFO if self.exit_code == EXIT_OK else logging.ERROR
        log.log(level, "stopped (exit status %d): %s", self.exit_code, self.stopping)
        self.service.close()

    def _housekeeping(self) -> None:
        self.loop.later(_HOUSEKEEPING, self._housekeeping)
        self.listener.rejections.report()
        self.cleanup.sweep()
        working = {child.zygote.pid for child in self.tracker.children.values()}
        for fleet in self.fleets.values():
            fleet.drops.forget(working)
        for record in self.store.expire():
            log.warning(
                "result of %s (%s) expired: no client collected it", record.handle, record.task
            )

    def _on_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum == signal.SIGHUP:
                if not self.stopping:
                    log.info("SIGHUP: reload")
                    for fleet in self.fleets.values():
                        fleet.reload()
            elif signum == signal.SIGUSR2:
                if not self.stopping:
                    log.info("SIGUSR2: refork")
                    for fleet in self.fleets.values():
                        fleet.refork()
            elif signum == signal.SIGQUIT or (signum == signal.SIGINT and self.stopping):
                self.stop(f"{signal_name(signum)}: fast stop", EXIT_OK, grace=0.0)
            else:
                self.stop(f"{signal_name(signum)}: graceful stop", EXIT_OK)

    def _reap(self) -> None:
        """Reap our own children: zygotes, and workers orphaned by theirs."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.cleanup.reaped(pid, bool(self.stopping)):
                continue
            if not any(fleet.reaped(pid, status) for fleet in self.fleets.values()):
                rusage = (usage.ru_utime, usage.ru_stime, usage.ru_maxrss)
                if not self.tracker.exit_status(pid, status, rusage):
                    log.debug("reaped process %d (%s)", pid, describe_wait_status(status))
                    self.cleanup.sweep()  # its children, if any, are ours now

    # -- clients ----------------------------------------------------------

    def _on_client_messages(self) -> None:
        for envelope, data, owner in self.listener.receive():
            try:
                msg = decode_request(data, self.config.max_message_bytes)
            except ProtocolError as exc:
                self.listener.rejections.add(envelope[0], str(exc))
                self._send(envelope, Error(request_id(data), exc.code, str(exc)))
                continue
            try:
                self._on_request(envelope, msg, owner)
            except Exception as exc:
                # A bug of ours; the client still gets an answer, not a hang.
                log.exception("internal error handling a %s request", msg.KIND)
                error = Error(request_id(data), ErrorCode.INTERNAL, f"server error: {exc}")
                self._send(envelope, error)

    def _on_request(self, envelope: Envelope, msg: Message, owner: str | None = None) -> None:
        if isinstance(msg, Spawn):
            self._on_spawn(envelope, msg, owner)
        elif isinstance(msg, Attach):
            self._on_attach(envelope, msg, owner)
        elif isinstance(msg, Collected):
            for handle in msg.handles:
                record = self.store.get(handle)
                if record is not None and record.result is not None and record.owner == owner:
                    record.collected = True
                    self._deliver(record)
        elif isinstance(msg, Kill):
            mine = self._record(msg.handle, owner) is not None
            if mine:
                self.outcomes.killed(msg.handle)  # first: a queued job fails right away
            pid = self.spawner.kill(msg.handle, msg.signal) if mine else None
            if pid is None:
                text = f"handle {msg.handle!r} has no running worker"
                self._send(envelope, Error(msg.req, ErrorCode.UNKNOWN_HANDLE, text))
            else:
                what = f"worker {pid}" if pid else "job, not started yet,"
                log.info(
                    "%s [%s] killed by a client (%s)", what, msg.handle, signal_name(msg.signal)
                )
                self._send(envelope, Ok(msg.req, {"pid": pid}))
        elif isinstance(msg, Ping):
            self._send(envelope, Ok(msg.req, report.identity(self)))
        elif isinstance(msg, Stats):
            self._send(envelope, Ok(msg.req, self.stats()))
        elif isinstance(msg, Jobs):
            listing = job_list(self.spawner.jobs.values(), self._unfinished, owner, self.loop.now())
            self._send(envelope, Ok(msg.req, {"jobs": listing}))
        elif isinstance(msg, Refork | Reload):
            self.generation_requests.request(
                envelope, msg, self._stop_message() if self.stopping else None
            )
        elif isinstance(msg, Stop):
            self._send(envelope, Ok(msg.req, {"stopping": True}))
            self.stop("stop requested by a client", EXIT_OK)

    def _record(self, handle: str, owner: str | None) -> Record | None:
        """A job's record, if `owner` may see it: kept by the store, or
        (dropped from it while the job still runs) by us until the job ends."""
        record = self._any_record(handle)
        return record if record is not None and record.owner == owner else None

    def _any_record(self, handle: str) -> Record | None:
        return self.store.get(handle) or self._unfinished.get(handle)

    def _on_spawn(self, envelope: Envelope, msg: Spawn, owner: str | None) -> None:
        known = None if msg.handle is None else self._any_record(msg.handle)
        if known is not None and known.owner == owner:
            self._on_attach(envelope, Attach(msg.req, known.handle), owner)  # the same, sent again
            return
        if known is not None:
            # Another key's job (one in 2**96 by chance): its owner alone sees it.
            text = f"job id {known.handle!r} is taken: pick a random one"
            self._send(envelope, Error(msg.req, ErrorCode.BAD_REQUEST, text))
            return
        ended = None if msg.handle is None else self.store.ended(msg.handle, owner)
        if ended is not None:  # sent again after its reply was lost, and gone since
            text = f"job {msg.handle} already ended, and is not run again: {ended}"
            self._send(envelope, Error(msg.req, ErrorCode.SPAWN_FAILED, text))
            return
        if self.stopping:
            self._send(envelope, Error(msg.req, ErrorCode.SHUTTING_DOWN, self._stop_message()))
            return
        if unknown := self.generation_requests.unknown_profile(msg.profile):
            self._send(envelope, Error(msg.req, ErrorCode.SPAWN_FAILED, unknown))
            return
        patterns = self._task_patterns[msg.profile or DEFAULT_PROFILE]
        if not task_allowed(msg.task, patterns):
            text = not_allowed(msg.task, patterns, bool(self.config.allow_tasks))
            self._send(envelope, Error(msg.req, ErrorCode.NOT_ALLOWED, text))
            return
        if self.spawner.full():
            self.busy_rejections += 1
            text = (
                f"server busy: {self.spawner.slots.taken} workers running and "
                f"{self.spawner.queued} requests queued (max-workers "
                f"{self.config.max_workers}, queue-size {self.config.queue_size})"
            )
            self._send(envelope, Error(msg.req, ErrorCode.BUSY, text))
            return
        # Ours have a ":", which the handles clients pick cannot contain; and
        # 96 random bits, so that nobody finds another's job by counting.
        handle = msg.handle or f"{self.server_id}:{secrets.token_hex(12)}"
        self._unfinished[handle] = self.store.open(handle, msg.task, envelope, msg.req, owner)
        self.outcomes.accepted(handle)
        self.spawner.submit(Job(handle, msg))

    def _on_attach(self, envelope: Envelope, msg: Attach, owner: str | None) -> None:
        record = self._record(msg.handle, owner)
        if record is None:
            ended = self.store.ended(msg.handle, owner)
            text = f"unknown handle {msg.handle!r}: " + (
                f"the job ended, {ended}" if ended else "no such job, or one long gone"
            )
            self._send(envelope, Error(msg.req, ErrorCode.UNKNOWN_HANDLE, text))
            return
        record.followers[envelope] = None
        if record.ready:
            self._send(envelope, self._spawned(record, msg.req))
        else:
            record.waiting.append((envelope, msg.req))
        self.output.replay(record, envelope)  # the kept tail, before the result
        self._deliver(record, only=envelope)

    def _send(self, envelope: Envelope, msg: Message) -> bool:
        """Queued for the end of this turn of the loop (outgoing.py)."""
        return self.outgoing.send(envelope, encode(msg))

    def _spawned(self, record: Record, req: int) -> Spawned:
        return Spawned(req, record.handle, record.pid, record.generation, record.warnings)

    def _deliver(self, record: Record, only: Envelope | None = None) -> None:
        """Push what is known of a record to its followers, then file it."""
        targets = [only] if only is not None else list(record.followers)
        if record.result is not None and (only or not record.result_sent):
            record.result_sent |= any([self.outgoing.send(t, record.result) for t in targets])
        if record.exited is not None and (only or not record.exit_sent):
            record.exit_sent |= any([self.outgoing.send(t, record.exited) for t in targets])
        for dropped in self.store.settle(record):
            log.warning(
                "dropped the uncollected result of %s (%s): more than %d results or %d bytes kept",
                dropped.handle,
                dropped.task,
                self.store.max_kept,
                self.store.max_bytes,
            )

    # -- what the spawner reports (outcomes.Clients); records change only here --

    def job_started(self, handle: str, pid: int, generation: int, warnings: list[str]) -> None:
        record = self._unfinished.get(handle)
        if record is None:  # not a job of ours: a bug, said by the caller's StateError
            return
        record.pid, record.generation, record.warnings = pid, generation, list(warnings)
        record.ready, record.started = True, self.loop.now()
        for envelope, req in record.waiting:
            # At once: a pool worker is woken right after, and would compete
            # with the reply (measured: handle 0.73 -> 1.30 ms).
            self.outgoing.send_now(envelope, encode(self._spawned(record, req)))
        record.waiting.clear()

    def job_result(self, handle: str, data: bytes) -> None:
        record = self._unfinished.get(handle)
        if record is not None:
            record.result = data
            self._deliver(record)

    def job_ended(self, handle: str, result: bytes | None, exited: bytes) -> None:
        # Its record, even if the store dropped it meanwhile (too many kept):
        # the clients following the job still get how it ended.
        record = self._unfinished.pop(handle, None)
        if record is None:
            return
        if result is not None:
            record.result = result
        record.exited = exited
        self._deliver(record)

    def job_failed(self, handle: str, code: ErrorCode, text: str, reasons: list[str]) -> None:
        record = self._unfinished.pop(handle, None)
        if record is not None:
            for envelope, req in record.waiting:
                self._send(envelope, Error(req, code, text, reasons))
        self.store.discard(handle, f"it failed: {text}")

    # -- stopping ---------------------------------------------------------

    def give_up(self, reason: str, code: int) -> None:
        """The last rung of the ladder: stop, loudly, with a non-zero status."""
        log.error("giving up: %s", reason.partition("\n")[0])  # in full when stopped
        self.stop(reason, code)

    def stop(self, reason: str, code: int, grace: float | None = None) -> None:
        """Refuse new work, answer the queue, let running workers finish
        within `grace` (then SIGTERM, then SIGKILL), and exit."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self.stopping:
            if grace == 0.0:
                self._terminate(signal.SIGKILL)
            return
        self.stopping = reason
        self.exit_code = code
        self.service.stopping(reason)
        self.generation_requests.stop(self._stop_message())
        log.info(
            "stopping (%s): %d running, %d queued; grace %gs",
            reason.partition("\n")[0],
            self.spawner.stats()["workers"],
            self.spawner.queued,
            grace,
        )
        self.spawner.stop(reason)
        for fleet in self.fleets.values():
            fleet.stop()
        self.loop.later(grace, self._terminate, signal.SIGTERM)

    def _terminate(self, sig: int) -> None:
        count = self.tracker.terminate(sig)
        if sig == signal.SIGTERM and count:
            # Counts ready-pool children that had not left yet, not just workers.
            log.warning("grace period over: sent SIGTERM to %d child processes", count)
            self.loop.later(self.config.kill_grace, self._terminate, signal.SIGKILL)

    def _stop_message(self) -> str:
        return shutting_down(self.stopping or "")

    def stats(self) -> dict[str, Any]:
        """A snapshot of the server for `Zygote.stats()` and `zygote status`."""
        return report.server_stats(self)
