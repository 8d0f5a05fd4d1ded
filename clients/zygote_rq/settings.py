"""What a ZygoteWorker tells its horses, and hears back: names and plain
values only (msgpack carries them; nothing is pickled but the job's own
return value, with the job's serializer)."""

from __future__ import annotations

import logging
from typing import Any, TypedDict

from redis import Redis, SSLConnection
from rq.connections import get_connection_kwargs
from rq.utils import import_attribute

__all__ = ["Finished", "HorseSettings", "import_path", "redis_kwargs"]

log = logging.getLogger("zygote.rq")

# Connection settings redis-py fills in itself; RQ's SpawnWorker drops them too.
_REBUILT_BY_REDIS = frozenset({"retry", "driver_info"})


class HorseSettings(TypedDict):
    """What the horse needs to rebuild the worker: names and plain values."""

    worker_class: str
    queues: list[str]
    job_class: str
    queue_class: str
    serializer: str | None
    exception_handlers: list[str]
    default_result_ttl: int
    worker_ttl: int
    job_monitoring_interval: int
    log_job_description: bool
    disable_default_exception_handler: bool
    logging: tuple[int | str, str, str]  # level, date format, log format


class Finished(TypedDict):
    """A horse's job that returned: the worker records the success."""

    started_at: str  # RQ's utcformat, as the horse saw them
    ended_at: str
    result: bytes  # the return value, dumped with the job's serializer


def import_path(obj: Any) -> str:
    """The dotted name the horse imports `obj` by; ValueError if that does
    not lead back to it (defined in __main__, or in a function)."""
    path = f"{obj.__module__}.{obj.__qualname__}"
    try:
        found = import_attribute(path)
    except (ImportError, AttributeError, ValueError):
        found = None
    if found is not obj:
        raise ValueError(
            f"{obj!r} cannot be imported as {path}: a zygote work horse finds it by name"
        )
    return path


def redis_kwargs(connection: Redis) -> dict[str, Any]:
    """The connection's settings, as plain values for the horse to connect alike."""
    kwargs = get_connection_kwargs(connection)
    if "path" in kwargs:
        kwargs["unix_socket_path"] = kwargs.pop("path")
    if issubclass(connection.connection_pool.connection_class, SSLConnection):
        kwargs["ssl"] = True  # Redis() picks SSLConnection from this flag
    plain = {key: value for key, value in kwargs.items() if _is_plain(value)}
    lost = sorted(set(kwargs) - set(plain) - _REBUILT_BY_REDIS)
    if lost:
        log.warning("the work horses connect to Redis without these settings: %s", ", ".join(lost))
    return plain


def _is_plain(value: object) -> bool:
    if value is None or isinstance(value, str | bytes | int | float):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):  # socket_keepalive_options, say
        return all(_is_plain(key) and _is_plain(item) for key, item in value.items())
    return False
