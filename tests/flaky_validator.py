"""Preload: a validator that fails for the first child only (raising or
hanging, as $ZYGOTE_TEST_FLAKY says), remembered in $ZYGOTE_TEST_DIR."""

import os
import time
from pathlib import Path

import zygote

MODE = os.environ.get("ZYGOTE_TEST_FLAKY", "raise")
MARK = Path(os.environ.get("ZYGOTE_TEST_DIR", "/tmp")) / "flaky-validator-ran"


@zygote.validator(name="flaky")
def flaky() -> None:
    # Of children starting together exactly one is the first: a hard link
    # fails if the name exists, and it appears with its content already in.
    mine = MARK.with_name(f"{MARK.name}.{os.getpid()}")
    mine.write_text(str(os.getpid()))
    try:
        os.link(mine, MARK)
    except FileExistsError:
        return
    finally:
        mine.unlink()
    if MODE == "hang":
        time.sleep(3600)  # a deadlock, as far as anyone can tell
    raise RuntimeError("first child is bad")


@zygote.after_fork
def reseed() -> None:
    os.environ["ZYGOTE_TEST_AFTER_FORK"] = str(os.getpid())


def after_fork_ran() -> str | None:
    return os.environ.get("ZYGOTE_TEST_AFTER_FORK")
