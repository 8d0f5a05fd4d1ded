"""The supervisor: owns the endpoint, the zygote and every worker.

One thread, one loop (`run`), readable top to bottom: wait for anything
(a client message, a zygote message, a worker's channel or exit, a signal,
a deadline), handle it, start queued jobs while slots are free. Signal
handlers only enqueue. It never imports user code and never forks the
application: zygotes are fresh interpreters, workers are their forks.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any

import zmq

from . import __version__
from .children import Job, JobState, Worker, ZygoteProc, ZygoteState
from .config import ConfigError, ServerConfig, ensure_private_dir
from .linux import (
    describe_wait_status,
    send_signal,
    set_child_subreaper,
    signal_name,
    wait_status_parts,
)
from .protocol import (
    BUSY,
    LOST,
    SHUTTING_DOWN,
    SPAWN_FAILED,
    TIMEOUT,
    UNKNOWN_HANDLE,
    Attach,
    Boot,
    Booted,
    BootFailed,
    Error,
    Exited,
    Fork,
    Forked,
    ForkFailed,
    Go,
    Kill,
    Message,
    Ok,
    Phase,
    Ping,
    ProtocolError,
    Ready,
    Reaped,
    Result,
    Spawn,
    Spawned,
    Stats,
    Stop,
    Task,
    ValidatorFailed,
    decode_channel,
    decode_request,
    encode,
    frame,
    request_id,
)
from .store import Envelope, Record, ResultStore
from .timers import Timers

log = logging.getLogger("zygote.supervisor")

#: Tasks whose arguments fit in this travel with the fork request, so the
#: child finds them decoded in memory; bigger ones go down the channel.
CARRY_LIMIT = 64 * 1024
#: Exit codes of `zygote start`.
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_BOOT = 0, 1, 2, 3
_BOOT_FAILURE_LIMIT = 3
_GO_FRAME = frame(encode(Go()))
_HOUSEKEEPING = 1.0


class Supervisor:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server_id = secrets.token_hex(4)
        self.started = time.monotonic()
        self._handle_numbers = itertools.count(1)
        self.timers = Timers()
        self.store = ResultStore(config.result_ttl, config.max_results)
        self.queue: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}
        self.workers: dict[int, Worker] = {}
        self.zygotes: dict[int, ZygoteProc] = {}  # by pid, current and retiring
        self.zygote: ZygoteProc | None = None  # the one that takes fork requests
        self.generation = 0
        self.booted_once = False
        self.boot_failures = 0
        self.slots = 0  # workers alive or being forked
        self.signals: collections.deque[int] = collections.deque()
        self.stopping: str | None = None
        self.exit_code = EXIT_OK
        self.counts: collections.Counter[str] = collections.Counter()
        self._handlers: dict[int, Any] = {}

    # -- lifecycle --------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        self._setup()
        try:
            while not self._done():
                self._wait_and_handle()
        finally:
            self._teardown()
        return self.exit_code

    def _setup(self) -> None:
        set_child_subreaper()
        self.context = zmq.Context(io_threads=1)
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 2000)
        # libzmq drops (and disconnects) anything bigger; between the two
        # limits a client gets a clear "too large" reply instead.
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.max_message_bytes + 65536)
        self.endpoint = self._bind(self.config.endpoint)
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        self._watch(self._wake_r.fileno(), self._on_signals)
        log.info("zygote %s listening on %s (pid %d)", __version__, self.endpoint, os.getpid())
        self._start_zygote()

    def _bind(self, endpoint: str) -> str:
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://") :]
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                ensure_private_dir(Path(parent))
            if os.path.exists(path) and _unix_socket_alive(path):
                raise ConfigError(f"another server is already listening on {endpoint}")
        try:
            self.router.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot listen on {endpoint}: {exc}") from None
        return str(self.router.getsockopt_string(zmq.LAST_ENDPOINT))

    def _done(self) -> bool:
        return self.stopping is not None and not self.jobs and not self.workers

    def _teardown(self) -> None:
        for zygote in list(self.zygotes.values()):
            self._retire(zygote)
        deadline = time.monotonic() + 5.0
        while self.zygotes and time.monotonic() < deadline:
            self._wait_and_handle(0.05)
        for zygote in self.zygotes.values():
            send_signal(zygote.pidfd, signal.SIGKILL)
        self.router.close()
        self.context.term()
        if self.endpoint.startswith("ipc://"):
            # libzmq leaves the socket file behind; clients look for it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint[len("ipc://") :])
        os.close(self.lifeline_w)
        log.info("stopped: %s", self.stopping)

    # -- the loop ---------------------------------------------------------

    def _watch(self, fd: int, handler: Any, flags: int = zmq.POLLIN) -> None:
        self._handlers[fd] = handler
        self.poller.register(fd, flags)

    def _unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def _wait_and_handle(self, cap: float = _HOUSEKEEPING) -> None:
        delay = self.timers.next_delay()
        timeout = cap if delay is None else min(delay, cap)
        for item, _ in self.poller.poll(int(timeout * 1000) + (delay is not None)):
            if item is self.router:
                self._on_client_messages()
            else:
                handler = self._handlers.get(item)
                if handler is not None:
                    handler()
        self.timers.run_due()
        for record in self.store.expire():
            log.warning("result of %s (%s) expired undelivered", record.handle, record.task)
        self._dispatch()

    def _on_signals(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum == signal.SIGQUIT or (signum == signal.SIGINT and self.stopping):
                self._begin_stop(f"{signal_name(signum)}: fast stop", EXIT_OK, grace=0.0)
            else:
                self._begin_stop(f"{signal_name(signum)}: graceful stop", EXIT_OK)

    # -- clients ----------------------------------------------------------

    def _on_client_messages(self) -> None:
        for _ in range(1000):  # then give the other sources a turn
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # DEALER clients send [id, body]; REQ clients [id, b"", body].
            envelope, data = tuple(frames[:-1]), frames[-1]
            if len(frames) not in (2, 3) or (len(frames) == 3 and frames[1]):
                log.warning("dropped a %d-frame message: one msgpack frame expected", len(frames))
                continue
            try:
                msg = decode_request(data, self.config.max_message_bytes)
            except ProtocolError as exc:
                log.warning("rejected a client message: %s", exc)
                self._send(envelope, Error(request_id(data), exc.code, str(exc)))
                continue
            self._on_request(envelope, msg)

    def _on_request(self, envelope: Envelope, msg: Message) -> None:
        if isinstance(msg, Spawn):
            self._on_spawn(envelope, msg)
        elif isinstance(msg, Attach):
            self._on_attach(envelope, msg)
        elif isinstance(msg, Kill):
            self._on_kill(envelope, msg)
        elif isinstance(msg, Ping):
            self._send(envelope, Ok(msg.req, self._identity()))
        elif isinstance(msg, Stats):
            self._send(envelope, Ok(msg.req, self.stats()))
        elif isinstance(msg, Stop):
            self._send(envelope, Ok(msg.req, {"stopping": True}))
            self._begin_stop("stop requested by a client", EXIT_OK)

    def _on_spawn(self, envelope: Envelope, msg: Spawn) -> None:
        if self.stopping:
            self._send(envelope, Error(msg.req, SHUTTING_DOWN, self._stop_message()))
            return
        free = self.slots < self.config.max_workers and not self.queue
        if not free and len(self.queue) >= self.config.queue_size:
            self.counts["busy"] += 1
            text = (
                f"server busy: {self.slots} workers running and {len(self.queue)} "
                f"requests queued (max-workers {self.config.max_workers}, "
                f"queue-size {self.config.queue_size})"
            )
            self._send(envelope, Error(msg.req, BUSY, text))
            return
        handle = f"{self.server_id}-{next(self._handle_numbers)}"
        job = Job(handle, msg, self.store.open(handle, msg.task, envelope, msg.req))
        self.jobs[handle] = job
        self.queue.append(job)
        self.counts["accepted"] += 1
        self._dispatch()

    def _on_attach(self, envelope: Envelope, msg: Attach) -> None:
        record = self.store.get(msg.handle)
        if record is None:
            text = (
                f"unknown handle {msg.handle!r}: it never existed, or its result was "
                "delivered or expired"
            )
            self._send(envelope, Error(msg.req, UNKNOWN_HANDLE, text))
            return
        record.followers[envelope] = None
        if record.ready:
            self._send(envelope, self._spawned(record, msg.req))
        else:
            record.waiting.append((envelope, msg.req))
        self._deliver(record, only=envelope)

    def _on_kill(self, envelope: Envelope, msg: Kill) -> None:
        job = self.jobs.get(msg.handle)
        worker = job.worker if job else None
        if worker is None or not worker.alive:
            text = f"handle {msg.handle!r} has no running worker"
            self._send(envelope, Error(msg.req, UNKNOWN_HANDLE, text))
            return
        send_signal(worker.pidfd, msg.signal)
        log.info(
            "worker %d [%s] sent %s by a client", worker.pid, msg.handle, signal_name(msg.signal)
        )
        self._send(envelope, Ok(msg.req, {"pid": worker.pid}))

    def _send(self, envelope: Envelope, msg: Message) -> bool:
        return self._send_raw(envelope, encode(msg))

    def _send_raw(self, envelope: Envelope, data: bytes) -> bool:
        """Send without blocking; False if the client is gone or not reading."""
        try:
            self.router.send_multipart([*envelope, data], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
            log.debug("could not reach a client: %s", exc)
            return False
        return True

    def _push(self, targets: list[Envelope], data: bytes) -> bool:
        """Send to every target; True if at least one took it."""
        sent = [self._send_raw(envelope, data) for envelope in targets]
        return any(sent)

    def _spawned(self, record: Record, req: int) -> Spawned:
        return Spawned(req, record.handle, record.pid, record.generation, record.warnings)

    def _deliver(self, record: Record, only: Envelope | None = None) -> None:
        """Push what is known of a record to its followers, then file it."""
        targets = [only] if only is not None else list(record.followers)
        if record.result is not None and (only or not record.result_delivered):
            record.result_delivered |= self._push(targets, record.result)
        if record.exited is not None and (only or not record.exit_delivered):
            record.exit_delivered |= self._push(targets, record.exited)
        for dropped in self.store.settle(record):
            log.warning(
                "dropped the undelivered result of %s (%s): more than %d kept",
                dropped.handle,
                dropped.task,
                self.store.max_kept,
            )

    # -- starting workers -------------------------------------------------

    def _dispatch(self) -> None:
        zygote = self.zygote
        while (
            self.queue
            and zygote is not None
            and zygote.state is ZygoteState.READY
            and self.slots < self.config.max_workers
        ):
            job = self.queue.popleft()
            if not self._request_fork(zygote, job):
                self.queue.appendleft(job)
                return

    def _request_fork(self, zygote: ZygoteProc, job: Job) -> bool:
        spawn = job.spawn
        job.carried = len(spawn.payload) <= CARRY_LIMIT
        request = Fork(job.handle, env=spawn.env, cwd=spawn.cwd)
        if job.carried:
            request = Fork(job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd)
        try:
            zygote.control.send(encode(request))
        except BlockingIOError:  # it is not reading: the fork deadline will tell why
            return False
        except OSError:
            self._zygote_lost(zygote, "its control socket broke")
            return False
        self.slots += 1
        job.requested = time.monotonic()
        job.state = JobState.FORKING
        job.zygote = zygote
        zygote.pending[job.handle] = job
        # Both deadlines are armed before the fork: a child that deadlocks
        # after it never reports anything, so only the parent side can tell.
        job.timers = [
            self.timers.add(self.config.fork_timeout, self._fork_overdue, job),
            self.timers.add(self.config.validate_timeout, self._ready_overdue, job),
        ]
        return True

    def _on_forked(self, zygote: ZygoteProc, msg: Forked, fds: list[int]) -> None:
        job = zygote.pending.pop(msg.handle, None)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            self._zygote_broken(zygote, f"sent {len(fds)} descriptors with a fork reply")
            return
        channel_fd, pidfd = fds
        if job is None or job.state is not JobState.FORKING:
            # We gave up on this fork already; the child must not run.
            send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            os.close(channel_fd)
            return
        channel = socket.socket(fileno=channel_fd)
        channel.setblocking(False)
        worker = Worker(msg.pid, pidfd, channel, job, zygote, job.requested)
        job.worker = worker
        job.state = JobState.STARTING
        job.timers[0].cancel()  # the fork deadline; the ready one stays
        job.record.warnings = list(msg.warnings)
        self.workers[worker.pid] = worker
        self._watch(channel_fd, lambda: self._on_channel(worker))
        self._watch(pidfd, lambda: self._on_worker_exit(worker))
        if not job.carried:
            spawn = job.spawn
            task = Task(job.handle, spawn.task, spawn.payload, spawn.env, spawn.cwd)
            if not worker.write(frame(encode(task))):
                self.poller.modify(channel_fd, zmq.POLLIN | zmq.POLLOUT)
        log.debug(
            "spawn %s %s: worker %d forked by generation %d",
            job.handle,
            job.spawn.task,
            worker.pid,
            zygote.generation,
        )

    def _fork_overdue(self, job: Job) -> None:
        if job.state is JobState.FORKING and job.zygote is not None:
            self._zygote_broken(
                job.zygote, f"did not answer a fork request within {self.config.fork_timeout:g}s"
            )

    def _ready_overdue(self, job: Job) -> None:
        worker = job.worker
        if job.state is JobState.FORKING:
            self._fork_overdue(job)
        elif job.state is JobState.STARTING and worker is not None and worker.alive:
            where = f" (stuck in {worker.phase})" if worker.phase else ""
            worker.failure = f"not ready within {self.config.validate_timeout:g}s{where}"
            send_signal(worker.pidfd, signal.SIGKILL)

    def _start_failed(self, job: Job, reason: str) -> None:
        """A start attempt failed: retry the job, or give up and tell the client."""
        job.cancel_timers()
        job.worker = None
        job.zygote = None
        job.reasons.append(reason)
        job.attempts += 1
        self.counts["failed_starts"] += 1
        if not self.stopping and job.attempts <= self.config.spawn_retries:
            log.warning(
                "spawn %s: %s; replacing it (attempt %d of %d)",
                job.handle,
                reason,
                job.attempts + 1,
                self.config.spawn_retries + 1,
            )
            job.state = JobState.QUEUED
            self.queue.appendleft(job)
            return
        if self.stopping:
            self._fail(job, SHUTTING_DOWN, self._stop_message())
        else:
            text = f"no healthy worker after {job.attempts} attempts: {reason}"
            log.error("spawn %s (%s): %s", job.handle, job.spawn.task, text)
            self._fail(job, SPAWN_FAILED, text)

    def _fail(self, job: Job, code: str, text: str) -> None:
        job.cancel_timers()
        job.state = JobState.DONE
        self.jobs.pop(job.handle, None)
        for envelope, req in job.record.waiting:
            self._send(envelope, Error(req, code, text, job.reasons))
        self.store.discard(job.handle)

    # -- workers ----------------------------------------------------------

    def _on_channel(self, worker: Worker) -> None:
        if worker.outbox and worker.flush():
            self.poller.modify(worker.channel.fileno(), zmq.POLLIN)
        try:
            frames, closed = worker.read()
        except ProtocolError as exc:
            frames, closed = [], True
            self._worker_misbehaved(worker, f"sent an oversized frame: {exc}")
        for data in frames:
            try:
                msg = decode_channel(data)
            except ProtocolError as exc:
                self._worker_misbehaved(worker, f"sent garbage: {exc}")
                break
            self._on_worker_message(worker, msg, data)
        if closed:
            self._close_channel(worker)

    def _on_worker_message(self, worker: Worker, msg: Message, data: bytes) -> None:
        job = worker.job
        if isinstance(msg, Phase):
            worker.phase = msg.name
        elif isinstance(msg, Ready):
            self._on_ready(worker)
        elif isinstance(msg, Result) and msg.handle == job.handle and not worker.result_seen:
            worker.result_seen = True
            job.record.result = data
            self._deliver(job.record)
            self._close_channel(worker)  # the worker's cue to exit
        elif isinstance(msg, ValidatorFailed):
            last = msg.error.strip().splitlines()[-1] if msg.error.strip() else "failed"
            worker.failure = f"{msg.name} failed: {last}"
            log.warning(
                "worker %d [%s] failed %s:\n%s",
                worker.pid,
                job.handle,
                msg.name,
                msg.error.rstrip(),
            )
            send_signal(worker.pidfd, signal.SIGKILL)
        else:
            self._worker_misbehaved(worker, f"sent an unexpected {msg.KIND} message")

    def _worker_misbehaved(self, worker: Worker, what: str) -> None:
        worker.failure = worker.failure or what
        log.error("worker %d [%s] %s; killing it", worker.pid, worker.job.handle, what)
        send_signal(worker.pidfd, signal.SIGKILL)

    def _on_ready(self, worker: Worker) -> None:
        job = worker.job
        if job.state is not JobState.STARTING:
            return
        worker.ready_at = time.monotonic()
        job.state = JobState.RUNNING
        job.cancel_timers()
        record = job.record
        record.pid, record.generation, record.ready = worker.pid, worker.generation, True
        for envelope, req in record.waiting:
            self._send(envelope, self._spawned(record, req))
        record.waiting.clear()
        if job.spawn.timeout is not None:
            job.timers.append(self.timers.add(job.spawn.timeout, self._task_overdue, worker))
        log.debug(
            "worker %d [%s] ready in %.1f ms",
            worker.pid,
            job.handle,
            (worker.ready_at - worker.requested) * 1000,
        )

    def _task_overdue(self, worker: Worker) -> None:
        if not worker.alive or worker.result_seen:
            return
        worker.timed_out = True
        log.warning(
            "worker %d [%s] %s ran past its %gs timeout; sending SIGTERM",
            worker.pid,
            worker.job.handle,
            worker.job.spawn.task,
            worker.job.spawn.timeout,
        )
        send_signal(worker.pidfd, signal.SIGTERM)
        self.timers.add(self.config.kill_grace, self._kill_if_alive, worker)

    def _kill_if_alive(self, worker: Worker) -> None:
        if worker.alive:
            send_signal(worker.pidfd, signal.SIGKILL)

    def _close_channel(self, worker: Worker) -> None:
        if worker.channel_open:
            worker.channel_open = False
            self._unwatch(worker.channel.fileno())
            worker.channel.close()

    def _on_worker_exit(self, worker: Worker) -> None:
        """Its pidfd turned readable: the process has exited."""
        if not worker.alive:
            return
        worker.alive = False
        self.slots -= 1
        self._unwatch(worker.pidfd)
        os.close(worker.pidfd)
        # Whatever it wrote before dying is in the channel now: read it
        # before deciding anything from the exit, or a finished result
        # would be reported as lost.
        if worker.channel_open:
            self._on_channel(worker)
            self._close_channel(worker)
        if worker.status is None and worker.zygote.state is ZygoteState.DEAD:
            self._reap_orphan(worker)
        self._finish(worker)

    def _on_status(self, worker: Worker, status: int, rusage: tuple[float, float, int]) -> None:
        worker.status = status
        worker.rusage = rusage
        if worker.alive:
            self._on_worker_exit(worker)
        else:
            self._finish(worker)

    def _reap_orphan(self, worker: Worker) -> None:
        """The worker's zygote is gone: the worker became our child (we are
        the subreaper), unless the zygote reaped it and died before saying."""
        try:
            pid, status, usage = os.wait4(worker.pid, os.WNOHANG)
        except ChildProcessError:
            worker.status_lost = True
            return
        if pid:
            worker.status = status
            worker.rusage = (usage.ru_utime, usage.ru_stime, usage.ru_maxrss)

    def _finish(self, worker: Worker) -> None:
        if not worker.ended or self.workers.get(worker.pid) is not worker:
            return
        del self.workers[worker.pid]
        job = worker.job
        if worker.status is not None:
            code, sig, _ = wait_status_parts(worker.status)
            words = describe_wait_status(worker.status)
        else:
            code, sig, words = None, None, "ended (exit status lost with its zygote)"
        lifetime = time.monotonic() - worker.requested
        if job.state in (JobState.FORKING, JobState.STARTING):
            reason = worker.failure or f"worker {worker.pid} {words} before it was ready"
            if worker.phase and not worker.failure:
                reason += f" (in {worker.phase})"
            log.warning("worker %d [%s] %s", worker.pid, job.handle, reason)
            self._start_failed(job, reason)
            self._dispatch()
            return
        record = job.record
        if not worker.result_seen:
            outcome = TIMEOUT if worker.timed_out else LOST
            what = (
                f"ran past its {job.spawn.timeout:g}s timeout and was killed"
                if worker.timed_out
                else words
            )
            message = f"worker {worker.pid} running {job.spawn.task} {what}"
            record.result = encode(
                Result(job.handle, outcome, message=message, exit_code=code, signal=sig)
            )
        utime, stime, maxrss = worker.rusage
        record.exited = encode(
            Exited(job.handle, worker.pid, code, sig, words, lifetime, utime, stime, maxrss)
        )
        job.cancel_timers()
        job.state = JobState.DONE
        self.jobs.pop(job.handle, None)
        self._deliver(record)
        self.counts["completed"] += 1
        level = logging.INFO if code == 0 and worker.result_seen else logging.WARNING
        log.log(
            level,
            "worker %d [%s] %s %s after %.1f ms",
            worker.pid,
            job.handle,
            job.spawn.task,
            words,
            lifetime * 1000,
        )
        self._dispatch()

    # -- zygotes ----------------------------------------------------------

    def _start_zygote(self) -> None:
        self.generation += 1
        zygote = ZygoteProc.start(self.generation, self.lifeline_r)
        self.zygotes[zygote.pid] = zygote
        self.zygote = zygote
        boot = Boot(
            zygote.generation,
            list(self.config.preload),
            os.getcwd(),
            self.config.max_message_bytes,
            self.config.log_level,
        )
        zygote.control.send(encode(boot))
        zygote.boot_timer = self.timers.add(self.config.boot_timeout, self._boot_overdue, zygote)
        self._watch(zygote.control.fileno(), lambda: self._on_control(zygote))
        log.info(
            "zygote generation %d starting (pid %d, preload: %s)",
            zygote.generation,
            zygote.pid,
            ", ".join(self.config.preload) or "nothing",
        )

    def _on_control(self, zygote: ZygoteProc) -> None:
        try:
            messages, closed = zygote.receive()
        except ProtocolError as exc:
            self._zygote_broken(zygote, f"sent garbage: {exc}")
            return
        for msg, fds in messages:
            if isinstance(msg, Forked):
                self._on_forked(zygote, msg, fds)
                continue
            for fd in fds:
                os.close(fd)
            if isinstance(msg, Reaped):
                worker = self.workers.get(msg.pid)
                if worker is not None:
                    self._on_status(worker, msg.status, (msg.utime, msg.stime, msg.maxrss_kb))
            elif isinstance(msg, ForkFailed):
                self._on_fork_failed(zygote, msg)
            elif isinstance(msg, Booted):
                self._on_booted(zygote)
            elif isinstance(msg, BootFailed):
                self._on_boot_failed(zygote, msg.error)
        if closed:
            self._zygote_lost(zygote, "it closed its control socket")

    def _on_booted(self, zygote: ZygoteProc) -> None:
        if zygote.boot_timer is not None:
            zygote.boot_timer.cancel()
        zygote.state = ZygoteState.READY
        self.booted_once = True
        self.boot_failures = 0
        log.info(
            "zygote generation %d ready (pid %d) after %.0f ms",
            zygote.generation,
            zygote.pid,
            (time.monotonic() - zygote.started) * 1000,
        )
        self._dispatch()

    def _on_boot_failed(self, zygote: ZygoteProc, error: str) -> None:
        log.error("zygote generation %d failed to preload:\n%s", zygote.generation, error.rstrip())
        self._zygote_broken(zygote, "its preload failed")
        self.boot_failures += 1
        if not self.booted_once or self.boot_failures >= _BOOT_FAILURE_LIMIT:
            self._begin_stop(
                "the zygote cannot preload: " + error.strip().splitlines()[-1], EXIT_BOOT, grace=0.0
            )

    def _boot_overdue(self, zygote: ZygoteProc) -> None:
        if zygote.state is ZygoteState.BOOTING:
            self._on_boot_failed(
                zygote, f"preload did not finish within {self.config.boot_timeout:g}s"
            )

    def _on_fork_failed(self, zygote: ZygoteProc, msg: ForkFailed) -> None:
        job = zygote.pending.pop(msg.handle, None)
        if job is not None and job.state is JobState.FORKING:
            self.slots -= 1
            self._start_failed(job, msg.error)

    def _zygote_broken(self, zygote: ZygoteProc, why: str) -> None:
        """Kill a zygote that cannot be trusted any more; a new one replaces it."""
        if zygote.state is ZygoteState.DEAD:
            return
        log.error(
            "zygote generation %d (pid %d) %s; killing it", zygote.generation, zygote.pid, why
        )
        send_signal(zygote.pidfd, signal.SIGKILL)
        self._zygote_lost(zygote, why)

    def _zygote_lost(self, zygote: ZygoteProc, why: str) -> None:
        """The zygote is gone (or as good as gone): requeue what it had not
        forked yet, release the workers it had, start its successor."""
        if zygote.state is ZygoteState.DEAD:
            return
        was_retiring = zygote.state is ZygoteState.RETIRING
        # Messages still queued (forks done, children reaped) count first.
        if zygote.control.fileno() in self._handlers:
            self._unwatch(zygote.control.fileno())
            try:
                for msg, fds in zygote.receive()[0]:
                    if isinstance(msg, Forked):
                        self._on_forked(zygote, msg, fds)
                    elif isinstance(msg, Reaped) and msg.pid in self.workers:
                        self._on_status(
                            self.workers[msg.pid], msg.status, (msg.utime, msg.stime, msg.maxrss_kb)
                        )
            except ProtocolError:
                pass
        zygote.state = ZygoteState.DEAD
        zygote.control.close()
        if zygote.boot_timer is not None:
            zygote.boot_timer.cancel()
        for job in reversed(list(zygote.pending.values())):
            # Never forked, or forked into a child that will see its channel
            # close and exit without running anything: safe to run again.
            self.slots -= 1
            job.cancel_timers()
            job.state = JobState.QUEUED
            job.zygote = None
            self.queue.appendleft(job)
        zygote.pending.clear()
        for worker in list(self.workers.values()):
            if worker.zygote is zygote and worker.job.carried and worker.channel_open:
                # It may have died between handing us the channel and
                # telling the child to go; one more Go is harmless.
                worker.write(_GO_FRAME)
        if not was_retiring:
            log.warning(
                "zygote generation %d (pid %d) lost: %s", zygote.generation, zygote.pid, why
            )
            self.counts["zygote_restarts"] += 1
        if zygote is self.zygote:
            self.zygote = None
            if not self.stopping:
                self._start_zygote()

    def _retire(self, zygote: ZygoteProc) -> None:
        if zygote.state in (ZygoteState.BOOTING, ZygoteState.READY):
            # Half-close: it sees end-of-file and exits, while we keep
            # reading what it still has to say (children it reaped).
            zygote.state = ZygoteState.RETIRING
            zygote.control.shutdown(socket.SHUT_WR)
        if zygote is self.zygote:
            self.zygote = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            rusage = (usage.ru_utime, usage.ru_stime, usage.ru_maxrss)
            zygote = self.zygotes.pop(pid, None)
            if zygote is not None:
                zygote.process.returncode = status
                zygote.reaped = True
                os.close(zygote.pidfd)
                words = describe_wait_status(status)
                self._zygote_lost(zygote, words)
                log.info("zygote generation %d (pid %d) %s", zygote.generation, pid, words)
                for worker in list(self.workers.values()):
                    if worker.zygote is zygote and not worker.alive and worker.status is None:
                        self._reap_orphan(worker)
                        self._finish(worker)
            elif pid in self.workers:
                self._on_status(self.workers[pid], status, rusage)
            else:
                log.debug("reaped process %d (%s)", pid, describe_wait_status(status))

    # -- stopping ---------------------------------------------------------

    def _begin_stop(self, reason: str, code: int, grace: float | None = None) -> None:
        grace = self.config.shutdown_grace if grace is None else grace
        if self.stopping:
            if grace == 0.0:
                self._terminate_workers(signal.SIGKILL)
            return
        self.stopping = reason
        self.exit_code = code
        log.info(
            "stopping (%s): %d running, %d queued; grace %gs",
            reason,
            len(self.workers),
            len(self.queue),
            grace,
        )
        while self.queue:
            self._fail(self.queue.popleft(), SHUTTING_DOWN, self._stop_message())
        if self.zygote is not None and not self.zygote.pending:
            self._retire(self.zygote)
        self.timers.add(grace, self._terminate_workers, signal.SIGTERM)

    def _terminate_workers(self, sig: int) -> None:
        for worker in self.workers.values():
            if worker.alive:
                send_signal(worker.pidfd, sig)
        if sig == signal.SIGTERM and self.workers:
            log.warning("grace period over: sent SIGTERM to %d workers", len(self.workers))
            self.timers.add(self.config.kill_grace, self._terminate_workers, signal.SIGKILL)

    def _identity(self) -> dict[str, Any]:
        return {
            "server": self.server_id,
            "pid": os.getpid(),
            "version": __version__,
            "max_workers": self.config.max_workers,
            "max_message_bytes": self.config.max_message_bytes,
        }

    def _stop_message(self) -> str:
        return f"server shutting down: {self.stopping}"

    def stats(self) -> dict[str, Any]:
        """A snapshot of the server for `Zygote.stats()` and `zygote status`."""
        zygote = self.zygote
        return {
            **self._identity(),
            "endpoint": self.endpoint,
            "uptime": time.monotonic() - self.started,
            "state": "stopping" if self.stopping else "running",
            "generation": zygote.generation if zygote else None,
            "zygote_pid": zygote.pid if zygote else None,
            "zygote_state": zygote.state.value if zygote else None,
            "workers": len(self.workers),
            "queued": len(self.queue),
            "queue_size": self.config.queue_size,
            "results_kept": self.store.undelivered,
            "accepted": self.counts["accepted"],
            "completed": self.counts["completed"],
            "failed_starts": self.counts["failed_starts"],
            "busy_rejections": self.counts["busy"],
            "zygote_restarts": self.counts["zygote_restarts"],
        }


def _unix_socket_alive(path: str) -> bool:
    """True if something accepts connections on the unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
