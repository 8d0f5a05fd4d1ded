"""Celery on zygote: `ZygotePool` runs each task in a fresh, validated fork
of a zygote that preloaded the worker's app.

    CELERY_CUSTOM_WORKER_POOL=zygote_celery:ZygotePool celery -A proj worker -P custom

or `worker_pool = "zygote_celery:ZygotePool"` in the app's configuration.
See docs/queues.md.
"""

from .pool import ZygotePool

__all__ = ["ZygotePool"]
