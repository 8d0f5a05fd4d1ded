"""Preload for the scaling benchmark: extra memory in the zygote, of the kind
and size $ZYGOTE_BENCH_HEAP_KIND / $ZYGOTE_BENCH_HEAP_MB say.

ordinary   a private anonymous mapping in 4 KiB pages, every page touched
hugepages  the same with madvise(MADV_HUGEPAGE): 2 MiB pages where possible
shared     zygote.share() of a numpy array: read-only shared memory
"""

from __future__ import annotations

import mmap
import os

import numpy as np

import zygote

MB = int(os.environ.get("ZYGOTE_BENCH_HEAP_MB", "0"))
KIND = os.environ.get("ZYGOTE_BENCH_HEAP_KIND", "ordinary")
SIZE = MB * 1024 * 1024
PAGE = mmap.PAGESIZE

if SIZE and KIND == "shared":
    DATA: object = zygote.share(np.ones(SIZE, dtype=np.uint8))
elif SIZE:
    DATA = mmap.mmap(-1, SIZE)
    if KIND == "hugepages":
        DATA.madvise(mmap.MADV_HUGEPAGE)
    for offset in range(0, SIZE, PAGE):  # touch every page: make it resident
        DATA[offset] = 1
