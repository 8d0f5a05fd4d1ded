"""Preload for the scaling benchmark: extra memory in the zygote, of the kind
and size $ZYGOTE_BENCH_HEAP_KIND / $ZYGOTE_BENCH_HEAP_MB say.

ordinary   Python objects (benchmarks.heap's dict records): what a preloaded
           application's own data usually is
hugepages  one numpy array: numpy asks for transparent huge pages
shared     the same array through zygote.share(): read-only shared memory
"""

from __future__ import annotations

import importlib
import os

import numpy as np

import zygote

MB = int(os.environ.get("ZYGOTE_BENCH_HEAP_MB", "0"))
KIND = os.environ.get("ZYGOTE_BENCH_HEAP_KIND", "ordinary")

DATA: object = None
if MB and KIND == "ordinary":
    DATA = importlib.import_module("benchmarks.heap")  # builds MB of records at import
elif MB:
    array = np.ones(MB * 1024 * 1024, dtype=np.uint8)  # every page written
    DATA = zygote.share(array) if KIND == "shared" else array
    del array
