"""Preload: a task whose result is a large `bytes` object (tests/test_memory.py)."""

SIZE = 15 << 20  # 15 MiB


def blob(i: int, size: int = SIZE) -> bytes:
    """A distinct `size`-byte result for each `i`, so nothing is shared."""
    return bytes([i % 256]) * size
