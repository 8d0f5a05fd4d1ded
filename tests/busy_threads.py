"""Preload: threads that keep the locks a child needs busy, each in its own
way, chosen by $ZYGOTE_TEST_BUSY (comma-separated):

- ``print``: a thread printing to a buffered file that replaced sys.stdout
  (its buffer lock is taken outside any logging handler);
- ``fork_lock``: a handler whose lock is also registered with
  zygote.fork_lock() (logging re-creates that lock in the child too), used
  by a logging thread;
- ``tls_read``: a thread parked in a TLS recv() on a peer that never
  answers ($ZYGOTE_TEST_TLS = HOST:PORT:CAFILE): forks must not wait for it;
- ``churn``: a thread that starts short-lived threads all the time, like a
  threaded server's request threads.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
import threading

import zygote

BUSY = set(filter(None, os.environ.get("ZYGOTE_TEST_BUSY", "").split(",")))
DIR = os.environ.get("ZYGOTE_TEST_DIR", "/tmp")

log = logging.getLogger("tests.busy")
log.propagate = False
log.setLevel(logging.INFO)


def _print_forever() -> None:
    n = 0
    while True:
        n += 1
        print("printing from a thread", n)


def _log_forever() -> None:
    while True:
        log.info("logging from a thread")


def _read_forever() -> None:
    host, port, cafile = os.environ["ZYGOTE_TEST_TLS"].split(":", 2)
    context = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection((host, int(port)))
    conn = context.wrap_socket(raw, server_hostname="localhost")
    with open(os.path.join(DIR, "tls-reading"), "w"):
        pass
    conn.recv(1)  # the echo server answers lines only: this waits forever


def _churn_forever() -> None:
    while True:
        short = threading.Thread(target=int)
        short.start()
        short.join()


if "print" in BUSY:
    sys.stdout = open(os.path.join(DIR, "stdout.txt"), "w", buffering=1 << 16)  # noqa: SIM115
    threading.Thread(target=_print_forever, name="printer", daemon=True).start()
if "fork_lock" in BUSY:
    handler = logging.FileHandler(os.path.join(DIR, "locked.log"))
    log.addHandler(handler)
    zygote.fork_lock(handler.lock)  # broke every worker once
    threading.Thread(target=_log_forever, name="logger", daemon=True).start()
if "tls_read" in BUSY:
    threading.Thread(target=_read_forever, name="tls-reader", daemon=True).start()
if "churn" in BUSY:
    threading.Thread(target=_churn_forever, name="churner", daemon=True).start()


def print_and_log(job: int) -> int:
    """A task that uses stdout and logging, which a thread holds busy."""
    print("task", job)
    sys.stdout.flush()
    log.info("task %d", job)
    return job
