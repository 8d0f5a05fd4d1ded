"""Preload: a large array in shared memory (zygote.share) and one on the heap."""

import numpy as np

import zygote

SHARED = zygote.share(np.arange(4 * 1024 * 1024, dtype=np.float64))  # 32 MiB
PRIVATE = np.arange(16, dtype=np.float64)


def total() -> float:
    return float(SHARED.sum())


def try_to_write() -> str:
    try:
        SHARED[0] = 42.0
    except ValueError as exc:
        return f"refused: {exc}"
    return "written"


def mapping_after_reading() -> dict:
    """Read the whole array, then describe this process's mapping of it."""
    SHARED.sum()
    found = {"perms": "", "rss_kb": 0, "anonymous_kb": 0}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0]:
                inside = "zygote-shared-array" in line
                if inside:
                    found["perms"] = fields[1]
            elif inside and fields[0] in ("Rss:", "Anonymous:"):
                key = "rss_kb" if fields[0] == "Rss:" else "anonymous_kb"
                found[key] += int(fields[1])
    return found
