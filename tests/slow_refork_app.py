"""Preload for a refork test: a `before_refork` hook slow enough (1 s) that
a signal sent once the candidate is the incoming generation arrives while
the refork is still under way."""

from __future__ import annotations

import time

import zygote


@zygote.before_refork
def _slow() -> None:
    time.sleep(1.0)
