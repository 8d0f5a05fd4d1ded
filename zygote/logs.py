"""The server's log lines: where they go (stderr or --log-file) and how they
look (--log-format text or json). Every process of the server — the
supervisor, each zygote, and the helpers and workers forked from it — sets
up its `zygote` logger here, from the same settings."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from typing import Any

__all__ = ["LOG_FORMAT", "JsonFormatter", "Tagged", "setup_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)-7s zygote[%(process)d] %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


class Tagged(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose lines start with a tag: "[profile] ..."."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['tag']} {msg}", kwargs  # type: ignore[index]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC, milliseconds), level,
    logger, pid, message, and `exc` (the traceback) when there is one. A
    message with newlines stays one line: json escapes them."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, file: str | None = None, fmt: str = "text") -> logging.Logger:
    """Send the `zygote` logger's records to stderr, or appended to `file`,
    one line each, as text or json: once per process (the supervisor, each
    zygote). Raises OSError if `file` cannot be opened.

    A WatchedFileHandler reopens the file when logrotate has moved it away,
    without a signal (SIGHUP means reload here); every process opens it in
    append mode, so their lines interleave whole."""
    handler: logging.Handler
    if file:
        handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("zygote")
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger
