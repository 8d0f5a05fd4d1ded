"""`ZygotePool`: a Celery worker pool that runs each task in a fresh,
validated fork of a preloaded zygote.

    CELERY_CUSTOM_WORKER_POOL=zygote_celery:ZygotePool celery -A proj worker -P custom -c 4

The pool talks to its zygote server from one thread of its own, on the
asyncio client. Celery's callbacks (accepted, succeeded, failed, timed out)
must run where prefork runs them, in the worker's event loop: the pool
queues them and asks the loop (kombu's hub, whose `call_soon` is
thread-safe) to run them; with no event loop they run on the pool's thread,
as in Celery's thread pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import Terminated, WorkerLostError
from celery.concurrency.base import BasePool
from celery.worker import state as worker_state
from kombu.utils.json import dumps as json_dumps

from zygote import aio
from zygote.errors import TaskError, WorkerLost, ZygoteError
from zygote.handle import relay_output

from .app_path import app_import_path
from .connection import ServerConnection
from .results import DeferredWrites, can_defer, store

__all__ = ["ZygotePool"]

log = logging.getLogger("zygote.celery")

#: the zygote task that runs one Celery task message (child.py)
RUN = "zygote_celery.child:run"


@dataclass(eq=False)
class _Job:
    """One task given to the pool: Celery's arguments and callbacks, and
    what became of it."""

    task_id: str
    callback: Callable[..., Any] | None
    error_callback: Callable[..., Any] | None
    accept_callback: Callable[..., Any] | None
    timeout_callback: Callable[..., Any] | None
    soft_timeout: float | None
    timeout: float | None
    args: tuple[Any, ...] = ()  # for zygote_celery.child:run
    handle: aio.Handle | None = None
    apply_result: ApplyResult | None = None
    dropped: bool = False  # flushed before it started
    #: the signal a revoke(terminate=True) sent; set before it started, the
    #: job is not started at all
    terminated: int | None = None
    timed_out: bool = False  # its hard time limit killed it
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None


class ApplyResult:
    """What `apply_async` returns; Celery calls `terminate()` on revoke."""

    def __init__(self, pool: ZygotePool, job: _Job) -> None:
        self._pool, self._job = pool, job

    def terminate(self, signum: int | None = None) -> None:
        self._pool._terminate(self._job, signum or signal.SIGTERM)


class ZygotePool(BasePool):
    """A Celery pool whose processes are zygote workers (see the module)."""

    signal_safe = False
    body_can_be_buffer = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _, hostname = self.options.get("initargs") or (self.app, "")
        self.hostname: str = hostname
        self.app_path = ""
        self.default_soft_timeout: float | None = self.options.get("soft_timeout")
        self.default_timeout: float | None = self.options.get("timeout")
        self._server = ServerConnection()  # where the tasks are spawned
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None
        self._jobs: set[_Job] = set()
        self._done = threading.Condition()
        self._callbacks: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]]
        self._callbacks = queue.SimpleQueue()
        self._hub: Any = None
        self._signalling: set[asyncio.Task[None]] = set()
        self._terminating = False  # a cold shutdown began
        #: how many bytes of result writes a fork may leave to us to store
        #: (results.DeferredWrites); 0: it stores them all itself
        self._defer = 0
        #: where we store them: the backend may block (Redis down, retrying)
        self._storing: concurrent.futures.ThreadPoolExecutor | None = None

    # -- Celery's pool interface -------------------------------------------

    def on_start(self) -> None:
        self.app_path = app_import_path(self.app)
        self._server.start(self.app_path, self.hostname, self.limit)
        self._thread = threading.Thread(target=self._loop.run_forever, name="zygote-pool")
        self._thread.start()
        client = self._call(self._connect()).result()
        if not os.environ.get("ZYGOTE_CELERY_STORE_IN_FORK") and can_defer(self.app.backend):
            # Well under the server's largest result: the task's own goes too.
            limit = self._call(client.stats()).result()["max_message_bytes"] // 4
            self._defer = min(DeferredWrites.LIMIT, limit)
            self._storing = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="zygote-results"
            )
        log.info(
            "zygote pool: %s, concurrency %d, %s server at %s",
            self.app_path,
            self.limit,
            "embedded" if self._server.server else "external",
            self._server.endpoint,
        )

    def register_with_event_loop(self, loop: Any) -> None:
        self._hub = loop

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        timeout_callback: Callable[..., Any] | None = None,
        error_callback: Callable[..., Any] | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        **_: Any,
    ) -> ApplyResult:
        # args: (task name, id, request dict, body, content type, encoding),
        # what prefork hands its children. The request goes as kombu's JSON
        # (it keeps datetimes and UUIDs), never pickled, and without the
        # decoded arguments: the fork decodes them from the body, which may
        # hold what JSON cannot (a pickled message's objects).
        name, task_id, request, body, content_type, content_encoding = args or ()
        job = _Job(
            task_id,
            callback,
            error_callback,
            accept_callback,
            timeout_callback,
            soft_timeout or self.default_soft_timeout,
            timeout or self.default_timeout,
        )
        job.apply_result = ApplyResult(self, job)  # Celery keeps only a weak reference
        try:
            headers = {k: v for k, v in request.items() if k not in ("args", "kwargs")}
            job.args = (
                self.app_path,
                self.hostname,
                name,
                task_id,
                json_dumps(headers),
                bytes(body) if isinstance(body, memoryview) else body,
                content_type,
                content_encoding,
                self._defer,
            )
        except Exception as exc:  # this task fails; the worker goes on
            self._refuse(job, WorkerLostError(f"zygote pool: cannot send the task: {exc!r}"))
            return job.apply_result
        with self._done:
            self._jobs.add(job)
        self._call(self._run(job))
        return job.apply_result

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        for job in self._running():
            if job.pid == pid:
                self._terminate(job, signal or 15)

    def flush(self) -> None:
        """Drop the tasks that have not started (as prefork does when the
        broker connection is lost, and at shutdown): their messages were
        not acknowledged, so the broker delivers them again."""
        for job in self._running():
            job.dropped = True

    def on_stop(self) -> None:
        """Warm shutdown: the running tasks finish; those that have not
        started go back to the broker. The worker's event loop stands still
        meanwhile, so its callbacks and timers (broker heartbeats) run here."""
        self.flush()
        if worker_state.should_terminate:  # a cold shutdown stops the pool this way too
            self.on_terminate()
            return
        while True:
            with self._done:
                if not self._jobs:
                    break
                self._done.wait(timeout=1.0)
            self._run_callbacks()
            if self._hub is not None:
                with contextlib.suppress(Exception):
                    self._hub.fire_timers(propagate=())
        self._close(grace=10.0)

    def on_terminate(self) -> None:
        """Cold shutdown: kill what runs; unacknowledged messages go back."""
        # What finished already reaches Celery (acknowledged, its result
        # stands); nothing more does after: a task killed here was not
        # revoked, and its unacknowledged message goes back to the broker.
        self._run_callbacks()
        self._terminating = True
        self.flush()
        if self._thread is not None:
            with contextlib.suppress(Exception):  # the server may be gone already
                self._call(self._kill(self._running(), signal.SIGKILL)).result(10)
        self._close(grace=0.0)

    def on_close(self) -> None:
        pass

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        info.update(
            {
                "processes": sorted(job.pid for job in self._running() if job.pid),
                "timeouts": (self.default_soft_timeout or 0, self.default_timeout or 0),
                "zygote": {
                    "endpoint": self._server.endpoint,
                    "embedded": self._server.server is not None,
                },
            }
        )
        return info

    @property
    def num_processes(self) -> int:
        return int(self.limit)

    def _running(self) -> list[_Job]:
        """The jobs given to the pool and not finished (any thread)."""
        with self._done:
            return list(self._jobs)

    # -- the pool's thread ---------------------------------------------------

    async def _connect(self) -> aio.Zygote:
        self._slots = asyncio.Semaphore(self.limit)
        return await self._server.open()

    async def _kill(self, jobs: list[_Job], signum: int) -> None:
        handles = [job.handle for job in jobs if job.handle is not None]
        await asyncio.gather(*(h.kill(signum) for h in handles), return_exceptions=True)

    async def _run(self, job: _Job) -> None:
        try:
            await self._execute(job)
        except Exception as exc:  # a bug here must not leave Celery waiting forever
            log.exception("zygote pool: task %s failed in the pool", job.task_id)
            self._deliver(job.error_callback, _einfo(WorkerLostError(f"zygote pool: {exc!r}")))
        finally:
            for timer in job.timers:
                timer.cancel()
            job.apply_result = None
            with self._done:
                self._jobs.discard(job)
                self._done.notify_all()

    async def _execute(self, job: _Job) -> None:
        assert self._slots is not None
        async with self._slots:
            if job.dropped:  # flushed: its message goes back to the broker
                return
            if job.terminated is not None:  # revoke(terminate=True) while it waited
                self._deliver(job.error_callback, _einfo(Terminated(-job.terminated)))
                return
            request: Any = getattr(job.callback, "__self__", None)
            if job.task_id in worker_state.revoked and hasattr(request, "revoked"):
                self._deliver(request.revoked)  # marks it revoked and acknowledges it
                return
            try:
                job.handle = await self._server.spawn(RUN, *job.args)
            except (ZygoteError, ValueError) as exc:  # ValueError: too big to send
                self._refuse(job, WorkerLostError(f"zygote could not start the task: {exc}"))
                return
            self._started(job, job.handle)
            self._finished(job, await self._stored(await self._outcome(job.handle)))

    def _refuse(self, job: _Job, error: BaseException) -> None:
        """A task that cannot run: accepted, then failed, so that Celery
        records the failure and acknowledges the message (or requeues it,
        by the task's acks_late settings) instead of waiting for it."""
        self._deliver(job.accept_callback, os.getpid(), time.monotonic())
        self._deliver(job.error_callback, _einfo(error))

    async def _outcome(self, handle: aio.Handle) -> tuple[Any, BaseException | None, str]:
        """(value, None, "") or (None, error, remote traceback). What the task
        prints goes to this worker's stdout/stderr as it comes, which Celery
        logs (worker_redirect_stdouts), as it would a prefork child's."""
        try:
            async for stream, data in handle.output():
                relay_output(stream, data)
            return await handle.result(), None, ""
        except TaskError as exc:  # raised outside Celery's tracer, or sys.exit()
            return None, exc, exc.remote_traceback
        except (WorkerLost, ZygoteError) as exc:
            return None, exc, ""

    async def _stored(
        self, outcome: tuple[Any, BaseException | None, str]
    ) -> tuple[Any, BaseException | None, str]:
        """The outcome once the writes its fork left to us are stored (on
        our thread for that, so that a backend that blocks holds up no other
        task); a write that fails fails the task, as it would have in the fork."""
        value, error, _ = outcome
        if error is not None or len(value) < 4 or not value[3]:
            return outcome
        assert self._storing is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._storing, store, self.app.backend, value[3])
        except Exception as exc:
            return None, exc, ""
        return outcome

    def _finished(self, job: _Job, outcome: tuple[Any, BaseException | None, str]) -> None:
        value, error, remote_traceback = outcome
        if job.timed_out:  # Celery recorded TimeLimitExceeded already
            return
        if job.terminated is not None:
            self._deliver(job.error_callback, _einfo(Terminated(-job.terminated)))
        elif isinstance(error, ZygoteError):
            lost = WorkerLostError(f"Worker exited prematurely: {error}.")
            self._deliver(job.error_callback, _einfo(lost, remote_traceback))
        elif error is not None:  # its result could not be stored
            self._deliver(job.error_callback, _einfo(error))
        else:
            failed, result, runtime = value[:3]
            if failed:
                result = pickle.loads(result)  # an ExceptionInfo, from our own child
            self._deliver(job.callback, (failed, result, runtime))

    def _started(self, job: _Job, handle: aio.Handle) -> None:
        self._deliver(job.accept_callback, handle.pid, time.monotonic())
        self._arm_time_limits(job)
        if job.terminated is not None:  # revoked while it was being forked
            self._signal(handle, job.terminated)

    def _arm_time_limits(self, job: _Job) -> None:
        if job.soft_timeout:
            job.timers.append(self._loop.call_later(job.soft_timeout, self._soft_limit, job))
        if job.timeout:
            job.timers.append(self._loop.call_later(job.timeout, self._hard_limit, job))

    def _soft_limit(self, job: _Job) -> None:
        # SIGUSR1 raises SoftTimeLimitExceeded in the task (child.py).
        assert job.handle is not None
        if job.handle.done():  # its result came first
            return
        self._deliver(job.timeout_callback, True, job.soft_timeout)
        self._signal(job.handle, signal.SIGUSR1)

    def _hard_limit(self, job: _Job) -> None:
        assert job.handle is not None
        if job.handle.done():  # its result came first: it stands
            return
        job.timed_out = True
        self._deliver(job.timeout_callback, False, job.timeout)
        self._signal(job.handle, signal.SIGKILL)

    def _signal(self, handle: aio.Handle, signum: int) -> None:
        async def send() -> None:
            try:
                await handle.kill(signum)
            except ZygoteError as exc:  # the server is gone: so is the task
                log.warning("zygote pool: could not signal %s: %s", handle.id, exc)

        # asyncio keeps only a weak reference to a task: hold it until done.
        task = self._loop.create_task(send())
        self._signalling.add(task)
        task.add_done_callback(self._signalling.discard)

    def _terminate(self, job: _Job, signum: int) -> None:
        def terminate() -> None:
            if job.terminated is None:
                job.terminated = signum
            if job.handle is not None:
                self._signal(job.handle, signum)

        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(terminate)

    # -- callbacks, where Celery runs them -------------------------------------

    def _deliver(self, callback: Callable[..., Any] | None, *args: Any) -> None:
        if callback is None or self._terminating:
            return
        self._callbacks.put((callback, args))
        if self._hub is not None:
            self._hub.call_soon(self._run_callbacks)
        else:
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        while True:
            try:
                callback, args = self._callbacks.get_nowait()
            except queue.Empty:
                return
            try:
                callback(*args)
            except Exception:
                log.exception("zygote pool: callback %r failed", callback)

    async def _shutdown(self) -> None:
        """In the loop: end what is left (a cold shutdown's jobs), then the client."""
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._server.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _close(self, grace: float) -> None:
        """After the last job: what it queued for Celery, then the client,
        the loop and the embedded server."""
        self._run_callbacks()
        if self._thread is not None:
            with contextlib.suppress(Exception):
                self._call(self._shutdown()).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
            self._loop.close()
        if self._storing is not None:
            self._storing.shutdown(wait=True)
            self._storing = None
        self._server.stop(grace)


def _einfo(exc: BaseException, remote_traceback: str = "") -> ExceptionInfo:
    """An ExceptionInfo as Celery's failure handlers take it."""
    try:
        raise exc
    except BaseException:
        einfo = ExceptionInfo()
    if remote_traceback:
        einfo.traceback = remote_traceback
    return einfo
