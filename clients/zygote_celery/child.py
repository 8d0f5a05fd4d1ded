"""The zygote side of `ZygotePool`: preloaded by the zygote, it sets the
Celery app up once (as prefork's `process_initializer` does in each pool
child), so that every task forked from it starts with the app loaded, its
tasks' tracers built and logging configured.

`run()` is the zygote task that executes one Celery task message in a
fresh worker, through Celery's own tracer: the result backend, retries,
task signals and hooks all run here, as in a prefork child. One exception,
with the Redis result backend: the task's final state (SUCCESS or FAILURE)
is encoded here but written by the pool, on the worker's own connection
(results.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Celery, signals
from celery._state import _set_task_join_will_block
from celery.app import trace
from celery.exceptions import SoftTimeLimitExceeded
from kombu.utils.imports import symbol_by_name
from kombu.utils.json import loads as json_loads

import zygote

from .results import DeferredWrites, can_defer

__all__ = ["run", "setup"]

#: the app this process was set up for, and the node name its tasks see
_app: Celery | None = None
_hostname = ""


def setup(app_path: str, hostname: str) -> Celery:
    """Load the app at `app_path` ("module:attribute") and prepare it to
    trace tasks, once per process (the zygote, or a worker forked from a
    zygote that did not preload this module)."""
    global _app, _hostname
    if _app is not None:
        if hostname != _hostname:
            trace._localized[2] = _hostname = hostname
        return _app
    app: Celery = symbol_by_name(app_path)
    app.loader.init_worker()
    app.loader.init_worker_process()
    # The worker exported its log settings to the environment (app.log.setup).
    app.log.setup(
        int(os.environ.get("CELERY_LOG_LEVEL", 0) or 0),
        os.environ.get("CELERY_LOG_FILE") or None,
        bool(os.environ.get("CELERY_LOG_REDIRECT", False)),
        str(os.environ.get("CELERY_LOG_REDIRECT_LEVEL")),
        hostname=hostname,
    )
    trace.setup_worker_optimizations(app, hostname)
    for name, task in app.tasks.items():
        task.__trace__ = trace.build_tracer(name, task, app.loader, hostname, app=app)
    # As in a pool child (prefork.py): a task must not wait on a subtask.
    _set_task_join_will_block(True)
    # Import what every task needs but Celery loads on first use: the result
    # backend's and the broker transport's modules (0.3 s for Redis's, paid
    # in every fork otherwise).
    app.backend  # noqa: B018
    with app.connection_for_write() as connection:
        connection.transport  # noqa: B018
    _warm_up_backend(app)
    _app, _hostname = app, hostname
    return app


def _warm_up_backend(app: Celery) -> None:
    """Make one round trip to a Redis result backend, then close it: the
    first connection of a process resolves the host name (loading the
    resolver's modules), looks redis-py's version up in the installed
    packages' metadata and fills caches that every fork would otherwise
    fill again (measured: 13 ms on a fork's first command, 3.4 ms after
    this). Closed again, so that no fork inherits a socket to share."""
    backend = app.backend
    if _is_plain_redis(backend):
        # redis-py looks its own version up in the installed packages'
        # metadata for every new connection unless given this (3 ms a fork).
        from redis.driver_info import DriverInfo

        backend.connparams.setdefault("driver_info", DriverInfo())
    pool = getattr(getattr(backend, "client", None), "connection_pool", None)
    if pool is None:  # not Redis
        return
    try:
        app.backend.client.ping()
    except Exception as exc:  # down now: each task will connect (and fail) itself
        logging.getLogger("zygote.celery").warning("result backend not reachable: %s", exc)
    finally:
        pool.disconnect()


def _is_plain_redis(backend: object) -> bool:
    """The Redis result backend itself (not Sentinel's, whose connection
    settings go elsewhere), with a redis-py that knows DriverInfo."""
    try:
        from celery.backends.redis import RedisBackend
        from redis.driver_info import DriverInfo  # noqa: F401
    except ImportError:
        return False
    return type(backend) is RedisBackend and isinstance(getattr(backend, "connparams", None), dict)


def run(
    app_path: str,
    hostname: str,
    name: str,
    task_id: str,
    request: str,
    body: bytes,
    content_type: str,
    content_encoding: str,
    defer: int = 0,
) -> list[Any]:
    """Execute one task message; returns [failed, value, runtime, writes]:
    what a prefork child returns, with a failure's ExceptionInfo pickled,
    and up to `defer` bytes of result writes left to the pool (see
    DeferredWrites; the pool stores them before it reports the task done)."""
    app = setup(app_path, hostname)
    signal.signal(signal.SIGUSR1, _soft_time_limit)
    signals.worker_process_init.send(sender=None)
    deferred = DeferredWrites(app.backend, task_id, defer)
    try:
        with deferred if defer and can_defer(app.backend) else contextlib.nullcontext():
            failed, value, runtime = trace.fast_trace_task(
                name, task_id, json_loads(request), body, content_type, content_encoding
            )
    except BaseException:
        # Out of the tracer (SystemExit in a hook after the result was
        # stored, say): what a prefork child had stored must stand.
        with contextlib.suppress(Exception):
            deferred.flush()
        raise
    finally:
        # A soft limit that comes after the task must not cut what follows.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    if failed:
        return [1, _pickled(value), runtime, deferred.writes]
    return [0, value, runtime, deferred.writes]


@zygote.before_refork
def close_connections() -> None:
    """A worker about to become the next zygote generation (`zygote refork`,
    `--refork-after`): close what its task opened, the result backend's and
    the broker's connections, so that no two forks share a socket."""
    if _app is None:
        return
    pool = getattr(getattr(_app.backend, "client", None), "connection_pool", None)
    if pool is not None:
        pool.disconnect()
    if _app._pool is not None:
        _app._pool.force_close_all()
    _app._after_fork()  # what Celery does in a multiprocessing child: new pools


def _soft_time_limit(signum: int, frame: object) -> None:
    # What billiard's pool children do on the soft limit: the task sees an
    # exception it may catch to clean up before the hard limit.
    raise SoftTimeLimitExceeded()


def _pickled(einfo: ExceptionInfo) -> bytes:
    """The failure for the worker's callbacks. Celery's tracer made the
    exception picklable already (or stored a stand-in); if pickling still
    fails, a RuntimeError carrying its repr and traceback goes instead."""
    try:
        return pickle.dumps(einfo)
    except Exception:
        try:
            raise RuntimeError(repr(einfo.exception))
        except RuntimeError:
            stand_in = ExceptionInfo()
        stand_in.traceback = einfo.traceback
        return pickle.dumps(stand_in)


# Preloaded by an embedded server: set the app up in the zygote itself.
if os.environ.get("ZYGOTE_CELERY_APP"):
    setup(os.environ["ZYGOTE_CELERY_APP"], os.environ.get("ZYGOTE_CELERY_HOSTNAME", ""))
