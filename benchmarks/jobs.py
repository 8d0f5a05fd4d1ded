"""Tasks the benchmarks run (preloaded with numpy and pandas)."""

from __future__ import annotations


def noop() -> None:
    return None


def echo(x: object) -> object:
    return x
