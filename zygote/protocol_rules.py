"""The rules a request's fields follow: task names, profile names, limits,
and the allow-list's matching. No I/O. Re-exported by `zygote.protocol`."""

from __future__ import annotations

import fnmatch
import re

from .protocol_errors import MalformedMessage

# Matched with fullmatch(): "$" would also match before a trailing newline.
_TASK_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MAX_TASK_LEN = 512

DEFAULT_PROFILE = "default"
#: The resource limits a spawn may set: bytes, CPU seconds, open files.
LIMIT_NAMES = ("memory", "cpu_seconds", "nofile")


def check_limits(limits: dict[str, float] | None) -> None:
    """Raise MalformedMessage unless `limits` is None or known names with
    positive values."""
    for name, value in (limits or {}).items():
        if name not in LIMIT_NAMES:
            raise MalformedMessage(f"unknown limit {name!r:.40}: one of {', '.join(LIMIT_NAMES)}")
        if not value > 0:
            raise MalformedMessage(f"limit {name} must be positive, not {value!r}")


_PROFILE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_profile_name(name: str | None) -> None:
    """Raise MalformedMessage unless `name` is None or a profile name."""
    if name is not None and not _PROFILE_RE.fullmatch(name):
        raise MalformedMessage(f"a profile name is 1-64 of [A-Za-z0-9_.-], not {name!r:.80}")


def check_task_name(task: str) -> None:
    """Raise MalformedMessage unless `task` looks like "package.module:qualname"."""
    if len(task) > _MAX_TASK_LEN or not _TASK_RE.fullmatch(task):
        raise MalformedMessage(f"task must look like 'package.module:function', not {task!r:.80}")


def task_allowed(task: str, patterns: list[str] | None) -> bool:
    """Does "module:qualname" match one of the allow-list's fnmatch patterns?
    None allows everything."""
    return patterns is None or any(fnmatch.fnmatchcase(task, p) for p in patterns)
