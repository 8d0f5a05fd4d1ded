"""Big preloaded arrays that stay cheap to fork.

fork() copies the page tables of every private mapping: about 100 ns per
4 KiB page, so 1 GiB of ordinary heap adds about 25 ms to every fork.
Shared mappings are not copied at all — the child maps them on demand.
`share()` puts an array in read-only shared memory for exactly that. (A
big numpy array is already better off than Python objects: numpy asks for
transparent huge pages, one page-table entry per 2 MiB instead of 512.)
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is the application's dependency, not zygote's
    import numpy


def share(array: numpy.ndarray) -> numpy.ndarray:
    """A read-only copy of `array` in shared memory; call it at preload time.

    Every worker sees the same physical pages, and a fork costs nothing for
    them. Writing to it raises ValueError (numpy) instead of letting one
    worker change what the others read. Object arrays cannot be shared.
    """
    import numpy as np

    if array.dtype.hasobject:
        raise TypeError("arrays of Python objects cannot be shared; use a numeric dtype")
    size = max(array.nbytes, 1)
    fd = os.memfd_create("zygote-shared-array", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as writable:
            target = np.ndarray(array.shape, array.dtype, buffer=writable)
            target[...] = array
            del target  # release the buffer before the mapping closes
        readonly = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)  # the mapping keeps the memory alive
    return np.ndarray(array.shape, array.dtype, buffer=readonly)
