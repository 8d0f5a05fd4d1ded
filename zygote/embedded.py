"""A zygote server started by and for one process: the job-queue
integrations (`zygote_celery`, `zygote_rq`) run one beside their worker
unless `$ZYGOTE_ENDPOINT` names a server to use instead.

The server is a child process on a private ipc socket (a fresh 0700
directory), with the parent's `sys.path` on its `PYTHONPATH` so that it
imports what the parent imports. Its log goes to the parent's stderr, at
WARNING unless `$ZYGOTE_LOG_LEVEL` says otherwise. It
runs in a session of its own (a Ctrl-C at the terminal is the parent's to
handle) and is sent SIGTERM by the kernel if the parent dies, so a
SIGKILLed Celery or RQ worker leaves no fork server behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence

from .client import Zygote
from .errors import ZygoteError

__all__ = ["EmbeddedServer", "preload_from_env"]


def preload_from_env(name: str = "ZYGOTE_PRELOAD") -> list[str]:
    """The comma-separated module list in `$ZYGOTE_PRELOAD`, as a list."""
    return [m.strip() for m in os.environ.get(name, "").split(",") if m.strip()]


class EmbeddedServer:
    """A `zygote start` child process preloading `preload`; `start()` returns
    once its zygote is ready, `stop()` ends it."""

    def __init__(
        self,
        preload: Iterable[str],
        *,
        max_workers: int | None = None,
        options: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.preload = list(dict.fromkeys(preload))  # in order, once each
        self.max_workers = max_workers
        self.options = list(options)
        self.env = env or {}
        self.endpoint = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = ""

    def start(self, timeout: float = 60.0) -> str:
        """Start the server and wait until it can fork; returns its endpoint.
        Raises ZygoteError if it exits first (a preload that fails to import,
        say) or is not ready within `timeout` seconds."""
        # ipc paths are limited to ~107 bytes: a short directory of our own.
        self._dir = tempfile.mkdtemp(prefix="zygote-", dir="/tmp")
        self.endpoint = f"ipc://{self._dir}/server.sock"
        command = [sys.executable, "-m", "zygote", "start", "--endpoint", self.endpoint]
        for module in self.preload:
            command += ["--preload", module]
        if self.max_workers is not None:
            command += ["--max-workers", str(self.max_workers)]
        command += self.options
        path = [p for p in sys.path if p and os.path.isdir(p)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            # One line per spawn would drown the worker's own log.
            "ZYGOTE_LOG_LEVEL": os.environ.get("ZYGOTE_LOG_LEVEL", "WARNING"),
            **self.env,
        }
        env.pop("ZYGOTE_ENDPOINT", None)  # ours is on the command line
        # The host process's systemd unit is not ours to report READY to.
        env.pop("NOTIFY_SOCKET", None)
        # A private ipc socket: a tcp server's keys (or a client's, which share
        # the names) are not for it.
        for name in ("ZYGOTE_CURVE_SECRET", "ZYGOTE_CURVE_CLIENTS", "ZYGOTE_INSECURE"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the worker's terminal is for the
            # worker, which stops the server itself once its tasks are done.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self._cleanup()
                raise ZygoteError(
                    f"the embedded zygote server exited with status {code} before it was "
                    f"ready (preload: {', '.join(self.preload)}); its log is above"
                )
            if self._ready():
                return self.endpoint
            if time.monotonic() > deadline:
                self.stop(grace=0)
                raise ZygoteError(
                    f"the embedded zygote server was not ready within {timeout:g}s "
                    f"(preload: {', '.join(self.preload)})"
                )
            time.sleep(0.05)  # a poll under the deadline above

    def _ready(self) -> bool:
        try:
            with Zygote(self.endpoint, timeout=2) as client:
                return bool(client.stats()["zygote_state"] == "ready")
        except ZygoteError:
            return False

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the server: SIGTERM lets running jobs finish within `grace`
        seconds (the server's own stop), grace=0 stops it at once (SIGQUIT).
        Returns its exit status."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM if grace > 0 else signal.SIGQUIT)
            try:
                process.wait(grace + 15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._cleanup()
        return process.returncode

    def _cleanup(self) -> None:
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""


def _die_with_parent() -> None:
    # In the child between fork and exec. The death signal follows the
    # thread that forked: start the server from a thread that lives as long
    # as the worker (its main thread), as both integrations do.
    from .linux import set_parent_death_signal

    set_parent_death_signal(signal.SIGTERM)
