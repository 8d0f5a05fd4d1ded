"""Where the zygote finds the Celery worker's app."""

from __future__ import annotations

import os
import sys

from celery import Celery

from zygote.errors import ZygoteError

__all__ = ["app_import_path"]


def app_import_path(app: Celery) -> str:
    """Where the zygote finds the worker's app: "module:attribute".

    `$ZYGOTE_CELERY_APP` if set; else the module `celery -A` named (or one
    of its submodules), or any other imported module, that holds this app."""
    if os.environ.get("ZYGOTE_CELERY_APP"):
        return os.environ["ZYGOTE_CELERY_APP"]
    named = _app_option(sys.argv)
    modules = sorted(
        (name for name, module in list(sys.modules.items()) if module is not None),
        # The -A module and its submodules first; never celery's own
        # (celery._state holds the current app too, but importing it
        # afresh gives a default app, not this one).
        key=lambda name: not (named and (name == named or name.startswith(named + "."))),
    )
    for name in modules:
        if name == "__main__" or name.split(".")[0] in ("celery", "kombu", "billiard"):
            continue
        for attribute, value in list(vars(sys.modules[name]).items()):
            if value is app:
                return f"{name}:{attribute}"
    raise ZygoteError(
        "zygote_celery: cannot tell which module holds the Celery app; "
        "set ZYGOTE_CELERY_APP=module:attribute"
    )


def _app_option(argv: list[str]) -> str:
    """The module of celery's -A/--app option, if given."""
    for i, arg in enumerate(argv):
        if arg in ("-A", "--app") and i + 1 < len(argv):
            return argv[i + 1].partition(":")[0]
        if arg.startswith("--app="):
            return arg[len("--app=") :].partition(":")[0]
        if arg.startswith("-A") and len(arg) > 2:
            return arg[2:].partition(":")[0]
    return ""
