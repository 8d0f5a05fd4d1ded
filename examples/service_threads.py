"""A preload shaped like a real service's: background threads that log at a
high rate to a rotating file and make TLS requests, and a task that logs and
makes one TLS request itself.

Forking such a process is what loses jobs to hung children: a logging thread
holds its file stream's buffer lock (Python does not reset it in the child)
and a TLS thread holds OpenSSL's locks. zygote's fork guards make it fork
only when no thread is inside either.

    python -m examples.tls_server            # prints HOST PORT CAFILE
    SERVICE_TLS="HOST:PORT:CAFILE" zygote start --preload examples.service_threads
    zygote spawn examples.service_threads:handle_job 1

Settings (environment): SERVICE_TLS (required), SERVICE_LOG (the log file,
default /tmp/zygote-service-<uid>.log), SERVICE_LOG_THREADS and
SERVICE_TLS_THREADS (how many of each, default 2), SERVICE_PAUSE (seconds
each thread rests between a log line or a request, default 0: flat out),
SERVICE_THREADS_IN:
``zygote`` (plain threads, started at import: the hazard) or ``helper`` (the
same loops as `@zygote.background` functions: they run in the helper
process, and the zygote has no thread at all). With ``zygote start
--thread-policy defer`` the plain threads are started in each worker instead.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
import threading
import time
from logging.handlers import RotatingFileHandler

import zygote

_host, _port, _cafile = os.environ["SERVICE_TLS"].split(":", 2)
LOG_FILE = os.environ.get("SERVICE_LOG", f"/tmp/zygote-service-{os.getuid()}.log")

log = logging.getLogger("service")
log.setLevel(logging.INFO)
log.propagate = False
# Small files: rollovers (the site of the classic hang) happen often.
log.addHandler(RotatingFileHandler(LOG_FILE, maxBytes=256 * 1024, backupCount=2))


def tls_request(text: str) -> str:
    """One request as a client library makes it: a fresh context (certificate
    loading), a connection (name resolution), a handshake, a round trip."""
    context = ssl.create_default_context(cafile=_cafile)
    with (
        socket.create_connection(("localhost", int(_port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.sendall(text.encode() + b"\n")
        return conn.recv(4096).decode().strip()


PAUSE = float(os.environ.get("SERVICE_PAUSE", "0"))


def _log_forever(name: str) -> None:
    n = 0
    while True:
        n += 1
        log.info("%s: heartbeat %d, all is well", name, n)
        if PAUSE:
            time.sleep(PAUSE)


def _request_forever(name: str) -> None:
    n = 0
    while True:
        n += 1
        tls_request(f"{name} {n}")
        if PAUSE:
            time.sleep(PAUSE)


_loops = [
    (_log_forever, f"log-{i}") for i in range(int(os.environ.get("SERVICE_LOG_THREADS", "2")))
]
_loops += [
    (_request_forever, f"tls-{i}") for i in range(int(os.environ.get("SERVICE_TLS_THREADS", "2")))
]
for _loop, _name in _loops:
    if os.environ.get("SERVICE_THREADS_IN", "zygote") == "helper":
        zygote.background(name=_name)(functools.partial(_loop, _name))
    else:
        threading.Thread(target=_loop, args=(_name,), name=_name, daemon=True).start()


def handle_job(job: int) -> int:
    """A task: log, make a TLS request, log again."""
    log.info("job %d: starting", job)
    answer = tls_request(f"job {job}")
    log.info("job %d: got %r", job, answer)
    return job
