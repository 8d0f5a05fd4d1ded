"""A Celery app for tests/test_celery.py: broker and backend from
$CELERY_BROKER_URL / $CELERY_RESULT_BACKEND (Redis by default)."""

from __future__ import annotations

import logging
import os
import sys
import time

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

app = Celery(
    "tests.celery_app",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/6"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/6"),
)
app.conf.update(
    task_default_queue=os.environ.get("CELERY_TEST_QUEUE", "celery"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("CELERY_TEST_PICKLE"):  # a worker that accepts pickled messages
    app.conf.accept_content = ["json", "pickle"]
if os.environ.get("CELERY_TEST_POOL"):  # the worker_pool setting, instead of -P
    app.conf.worker_pool = os.environ["CELERY_TEST_POOL"]
logger = get_task_logger(__name__)
IMPORTED_AT = time.time()


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def whoami() -> dict[str, object]:
    """Where the task ran: its process, and what was imported before it."""
    return {"pid": os.getpid(), "ppid": os.getppid(), "preloaded": "numpy" in sys.modules}


@app.task
def boom(message: str) -> None:
    raise ValueError(message)


@app.task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(bind=True)
def soft_limited(self, seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up after the soft time limit"
    return "not interrupted"


@app.task
def crash() -> None:
    os._exit(3)


@app.task(bind=True, max_retries=2, default_retry_delay=0)
def flaky(self, key: str) -> int:
    """Fails until it has been retried twice; counts tries in Redis."""
    import redis

    tries = redis.Redis.from_url(os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/6"))
    count = int(tries.incr(key))
    if count < 3:
        raise self.retry(exc=RuntimeError(f"try {count}"))
    return count


@app.task
def shout(message: str) -> str:
    print(f"printed: {message}")  # stdout, which Celery's worker logs
    logger.warning("task says: %s", message)
    logging.getLogger("tests.celery_app.plain").warning("plain logger says: %s", message)
    return message


@app.task(acks_late=True)
def late(key: str) -> str:
    """Hangs on its first try; returns on the next (tries counted in Redis)."""
    import redis

    tries = redis.Redis.from_url(os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/6"))
    if int(tries.incr(key)) == 1:
        time.sleep(60)
    return "second try"


@app.task
def kind(value: object) -> str:
    """The type of what arrived (a pickled message can carry any object)."""
    return type(value).__name__


@app.task
def mark(key: str) -> str:
    """Records in Redis that it ran."""
    import redis

    url = os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/6")
    redis.Redis.from_url(url).set(key, 1)
    return key


@app.task
def total(values: list[int]) -> int:
    """A chord's body."""
    return sum(values)


@app.task
def text(size: int) -> str:
    return "x" * size


def _seen(task_id: str, when: str) -> None:
    import redis

    url = os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/6")
    state = app.AsyncResult(task_id).state
    redis.Redis.from_url(url).rpush(f"seen-{task_id}", f"{when}:{state}")


class Reporting(app.Task):  # type: ignore[name-defined]
    """Records in Redis the state it sees of itself after it returned."""

    def on_success(self, retval: object, task_id: str, args: object, kwargs: object) -> None:
        _seen(task_id, "on_success")

    def after_return(self, *args: object, **kwargs: object) -> None:
        _seen(self.request.id, "after_return")


@app.task(base=Reporting)
def reporting() -> str:
    return "done"
