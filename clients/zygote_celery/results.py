"""The result writes a fork leaves to its pool.

With the Redis result backend, a fresh fork that stores its task's result
itself opens a connection first (TCP, CLIENT SETINFO twice, SELECT), then
checks the key and writes it: measured, 3-4 ms of the fork's CPU and ~800
copy-on-write faults, against ~0.5 ms on the worker's open connection (the
pool's thread for it, schedstat). So
the fork encodes the write as Celery would (`DeferredWrites`, in the fork)
and hands it back with its outcome; the pool writes it (`store`, in the
celery worker) before it reports the task done. Imported by both sides:
no side effects here.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.base import KeyValueStoreBackend
from kombu.utils.encoding import bytes_to_str

__all__ = ["DeferredWrites", "can_defer", "store"]


def can_defer(backend: object) -> bool:
    """Whether a task's final writes to `backend` can be left to the pool:
    the Redis backend itself (not a subclass: Sentinel's, a user's), whose
    `_store_result` is Celery's key-value one (DeferredWrites repeats it
    up to the write, store() from there)."""
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # no redis-py
        return False
    return (
        type(backend) is RedisBackend
        and RedisBackend._store_result is KeyValueStoreBackend._store_result  # type: ignore[attr-defined]
    )


def store(backend: Any, writes: list[list[Any]]) -> None:
    """Write what a fork's DeferredWrites kept ([key, encoded meta, state]
    each, in order) as KeyValueStoreBackend._store_result would have: not
    over a SUCCESS already stored (a redelivered duplicate's), under the
    backend's retry policy (`result_backend_always_retry`)."""
    retrying = getattr(backend, "_ensure_retryable", None)
    for key, value, state in writes:
        if retrying is None:
            _write(backend, key, value, state)
        else:
            retrying(_write, backend, key, value, state)


def _write(backend: Any, key: bytes, value: str | bytes, state: str) -> None:
    current = backend.get(key)
    if current and backend.decode_result(current)["status"] == states.SUCCESS:
        return
    backend._set_with_state(key, value, state)


class DeferredWrites:
    """In a fork: keeps the task's final state and result as Celery encoded
    them for its Redis backend, for the pool to write with the worker's
    connection, instead of opening a connection of its own (measured: the
    connection, the duplicate check and the write cost a fresh fork 3-4 ms
    of CPU and ~800 copy-on-write faults, the pool ~0.5 ms).

    Only this task's SUCCESS or FAILURE, outside a chord (whose last part
    reads every part's result at once), up to `limit` bytes; once one
    write is kept, the later ones for this task are too, so that they keep
    their order. Any other write first stores what was kept, then goes
    through as usual. Reads of this task's state in the fork see the kept
    write."""

    #: encoded bytes a fork keeps at most; above, it writes itself
    LIMIT = 256 * 1024

    def __init__(self, backend: Any, task_id: str, limit: int = LIMIT) -> None:
        self.backend, self.task_id, self.limit = backend, task_id, limit
        self.writes: list[list[Any]] = []
        self._size = 0

    def __enter__(self) -> DeferredWrites:
        # Instance attributes shadow the class's methods, in this fork only.
        self.backend._store_result = self._store_result
        self.backend._get_task_meta_for = self._get_task_meta_for
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("_store_result", "_get_task_meta_for"):
            vars(self.backend).pop(name, None)

    def flush(self) -> None:
        writes, self.writes = self.writes, []
        store(self.backend, writes)

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        backend = self.backend
        if task_id == self.task_id and (
            self.writes or (state in (states.SUCCESS, states.FAILURE) and not _chord(request))
        ):
            # KeyValueStoreBackend._store_result up to the write.
            meta = backend._get_result_meta(
                result=result, state=state, traceback=traceback, request=request
            )
            meta["task_id"] = bytes_to_str(task_id)
            value = backend.encode(meta)
            if self._size + len(value) <= self.limit:
                self._size += len(value)
                self.writes.append([backend.get_key_for_task(task_id), value, state])
                return result
        self.flush()
        kind = type(backend)
        return kind._store_result(backend, task_id, result, state, traceback, request, **kwargs)

    def _get_task_meta_for(self, task_id: str) -> Any:
        if task_id == self.task_id and self.writes:
            return self.backend.decode_result(self.writes[-1][1])
        return type(self.backend)._get_task_meta_for(self.backend, task_id)


def _chord(request: Any) -> bool:
    return bool(getattr(request, "chord", None))
