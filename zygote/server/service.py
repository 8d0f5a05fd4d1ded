"""What an init system sees of the server: systemd's notifications
(READY=1, STATUS=..., STOPPING=1), the pidfile, the process title.

The supervisor tells this module when it listens, when a stop begins and
when it exits; the rest (ready, a new generation, a zygote lost) is derived
from the fleets after every turn of the loop, so that neither the fleet nor
the spawner has to report it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ..config import ConfigError, ServerConfig
from ..linux import sd_notify, set_process_title
from ..protocol import DEFAULT_PROFILE
from .children import ZygoteState
from .fleet import Fleet

log = logging.getLogger("zygote.supervisor")

__all__ = ["Service", "check_pidfile"]


class Service:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # Taken out of the environment, so that zygotes, workers and what
        # tasks start do not inherit it: only the main process speaks to systemd.
        self.notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
        self.pidfile = Path(config.pidfile) if config.pidfile else None
        if self.pidfile is not None:
            check_pidfile(self.pidfile)
        self.ready_sent = False
        self._serving: tuple[int, ...] = ()  # each profile's serving generation, 0: none
        # Before ZeroMQ's threads exist: the first title touches the environment.
        set_process_title(f"zygote: supervisor {config.endpoint}")

    def listening(self) -> None:
        """The endpoint is bound: write the pidfile (whole, or not at all)."""
        if self.pidfile is not None:
            temporary = self.pidfile.with_name(f".{self.pidfile.name}.{os.getpid()}")
            temporary.write_text(f"{os.getpid()}\n")
            os.replace(temporary, self.pidfile)

    def update(self, fleets: Mapping[str, Fleet], stopping: str | None) -> None:
        """After every turn of the loop: READY=1 once every profile's first
        zygote serves, and a STATUS line whenever a generation takes over or
        a zygote is lost (a tuple compared, nothing sent otherwise)."""
        if stopping:
            return
        serving = tuple(
            f.current.generation
            if f.current is not None and f.current.state is ZygoteState.READY
            else 0
            for f in fleets.values()
        )
        if serving == self._serving:
            return
        self._serving = serving
        if not all(serving):
            lost = ", ".join(name for name, g in zip(fleets, serving, strict=True) if not g)
            what = "starting" if not self.ready_sent else "a zygote was lost"
            self.notify(f"STATUS={what}: waiting for a zygote ({lost})")
            return
        default, *others = [
            f"{g}" if name == DEFAULT_PROFILE else f"{name} {g}"
            for name, g in zip(fleets, serving, strict=True)
        ]
        profiles = f" ({', '.join(others)})" if others else ""
        workers = self.config.max_workers
        text = f"serving, generation {default}{profiles}, up to {workers} workers"
        self.notify(f"STATUS={text}" if self.ready_sent else f"READY=1\nSTATUS={text}")
        self.ready_sent = True

    def stopping(self, reason: str) -> None:
        self.notify(f"STOPPING=1\nSTATUS=stopping: {reason}")

    def close(self) -> None:
        """At exit: remove the pidfile if it still names us (a later server
        may have taken it over)."""
        with contextlib.suppress(OSError, ConfigError):
            if self.pidfile is not None and _read_pid(self.pidfile) == os.getpid():
                self.pidfile.unlink()

    def notify(self, state: str) -> None:
        if self.notify_socket and not sd_notify(self.notify_socket, state):
            log.debug("could not notify %s of %r", self.notify_socket, state)


def check_pidfile(path: Path) -> None:
    """Raise ConfigError if `path` names a live process other than us; a
    file left behind by a server that is gone is taken over."""
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write pidfile {path}: {path.parent} is not a writable directory")
    pid = _read_pid(path)
    if pid is None or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        log.info("pidfile %s named process %d, which is gone: taking it over", path, pid)
        return
    except PermissionError:  # alive, another user's
        pass
    raise ConfigError(
        f"pidfile {path} names process {pid}, which is running: another server? "
        "(remove the file if that process is not one)"
    )


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read pidfile {path}: {exc.strerror}") from None
    return int(text) if text.isdigit() else None
