"""A batch against a running server: `python -m examples.batch [ENDPOINT]`.

Start a server first (`zygote start --preload examples.tasks`), from the
repository root so that `examples` is importable by the zygote.
"""

from __future__ import annotations

import sys
import time

from zygote import TaskError, Zygote


def main(endpoint: str | None = None) -> None:
    with Zygote(endpoint, timeout=60) as z:
        started = time.perf_counter()
        squares = list(z.map("examples.tasks:slow_square", range(16)))
        print(f"16 squares in {time.perf_counter() - started:.2f}s: {squares}")

        handle = z.spawn("examples.tasks:whoami")
        print(f"worker {handle.pid} (generation {handle.generation}): {handle.result()}")
        exit_info = handle.wait()
        print(
            f"it {exit_info.description} after {exit_info.duration * 1000:.1f} ms, "
            f"max RSS {exit_info.maxrss_kb} kB"
        )

        try:
            z.spawn("examples.tasks:fail", "on purpose").result()
        except TaskError as exc:
            print(f"the failing task raised {exc}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
