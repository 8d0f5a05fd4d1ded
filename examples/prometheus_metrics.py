"""Prometheus metrics from one-task workers: prometheus_client's multiprocess
mode, served by a background function in the helper process.

Each worker writes its samples to files of its own in
PROMETHEUS_MULTIPROC_DIR; the helper serves all of them, added up, on one
port. Workers come and go by the thousand, so the helper also folds the
files of dead workers into one archive file per kind of metric (counters,
histograms and summaries add up; live gauges of a dead worker are dropped).

    mkdir -p /tmp/metrics
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics zygote start --preload examples.prometheus_metrics
    zygote spawn examples.prometheus_metrics:handle 1
    curl -s localhost:9464/metrics | grep tasks_handled

Settings (environment): PROMETHEUS_MULTIPROC_DIR (required, an empty
directory of the server's own), METRICS_PORT (default 9464, on 127.0.0.1),
METRICS_ARCHIVE_EVERY (seconds, default 10). Needs `pip install
prometheus_client`.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

import zygote

METRICS_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"]
PORT = int(os.environ.get("METRICS_PORT", "9464"))
ARCHIVE_EVERY = float(os.environ.get("METRICS_ARCHIVE_EVERY", "10"))

TASKS = Counter("tasks_handled", "Tasks handled by workers")


# A scrape reads the files while the archiving removes some: one at a time.
_FILES = threading.Lock()


class _OneAtATime:
    def __init__(self) -> None:
        self.collector = MultiProcessCollector(None)

    def collect(self) -> list[Any]:
        with _FILES:
            return list(self.collector.collect())


@zygote.background
def serve_metrics() -> None:
    """The endpoint, and the housekeeping of dead workers' files."""
    registry = CollectorRegistry()
    registry.register(_OneAtATime())
    start_http_server(PORT, addr="127.0.0.1", registry=registry)
    while True:
        with _FILES:
            archive_dead_workers(METRICS_DIR)
        time.sleep(ARCHIVE_EVERY)


def archive_dead_workers(path: str) -> int:
    """Fold the files of workers that are gone into `<kind>_archive.db`;
    returns how many files went. Only this function writes the archives.
    (A helper killed between adding a file and removing it counts that
    file twice: the window is a few microseconds per file.)"""
    folded = 0
    for name in glob.glob(os.path.join(path, "*_*.db")):
        kind, _, rest = os.path.basename(name).partition("_")
        pid = rest[: -len(".db")].rpartition("_")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "gauge":
            mark_process_dead(int(pid), path)  # live gauges go with their process
        elif kind in ("counter", "histogram", "summary"):
            archive = MmapedDict(os.path.join(path, f"{kind}_archive.db"))
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(name):
                    total, _ = archive.read_value(key)
                    archive.write_value(key, total + value, timestamp)
            finally:
                archive.close()
            os.unlink(name)
            folded += 1
    return folded


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def handle(job: int) -> int:
    """A task that counts itself."""
    TASKS.inc()
    return job
