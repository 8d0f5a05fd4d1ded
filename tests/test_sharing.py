"""zygote.share(): big preloaded arrays in read-only shared memory."""

from __future__ import annotations

import numpy as np
import pytest

import zygote


def test_share_copies_into_read_only_memory() -> None:
    original = np.arange(12, dtype=np.int32).reshape(3, 4)
    shared = zygote.share(original)
    assert shared.shape == (3, 4) and shared.dtype == np.int32
    assert (shared == original).all()
    with pytest.raises(ValueError, match="read-only"):
        shared[0, 0] = 1
    original[0, 0] = 99  # a copy: the original stays the caller's
    assert shared[0, 0] == 0


def test_share_refuses_object_arrays_and_handles_empty_ones() -> None:
    with pytest.raises(TypeError, match="Python objects"):
        zygote.share(np.array([object()]))
    assert zygote.share(np.zeros(0)).size == 0


def test_workers_read_the_shared_pages_and_cannot_write_them(start_server) -> None:
    server = start_server(preload=("tests.tasks", "tests.bigdata"))
    client = server.client(timeout=30)
    n = 4 * 1024 * 1024
    assert client.spawn("tests.bigdata:total").result() == float(n * (n - 1) // 2)
    assert client.spawn("tests.bigdata:try_to_write").result().startswith("refused")
    # In the worker the array is a shared, read-only mapping: reading all of
    # it maps the same shared-memory pages, and not one is an anonymous copy.
    mapping = client.spawn("tests.bigdata:mapping_after_reading").result()
    assert mapping["perms"] == "r--s"
    assert mapping["rss_kb"] >= 32 * 1024
    assert mapping["anonymous_kb"] == 0
