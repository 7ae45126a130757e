"""Log lines of the API: text or one JSON object per line (SERVING_LOG_FORMAT), for our access
log (`serving.access`) and uvicorn's own messages alike."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ACCESS = logging.getLogger("serving.access")
# Fields an access-log record carries (logging's `extra`), in the order the text format writes them.
ACCESS_FIELDS = ("client", "method", "path", "status", "duration_ms", "model_version", "request_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any access-log fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                               + f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        for key in ACCESS_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def uvicorn_log_config(log_format: str) -> dict[str, Any]:
    """uvicorn's `log_config`: its messages and ours on stderr, in the chosen format."""
    formatter = "serving.logs.JsonFormatter" if log_format == "json" else "serving.logs.TextFormatter"
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},  # ours has the request id
            "serving": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(log_format: str) -> None:
    """Our loggers' handler when uvicorn's log_config did not set one (tests, a custom server)."""
    logger = logging.getLogger("serving")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
