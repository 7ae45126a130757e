"""Log lines of the API: text or one JSON object per line (SERVING_LOG_FORMAT), for the access log
and for uvicorn's and our other messages alike."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

_PIPE_BUF = 4096  # POSIX guarantees at least 512; Linux's is 4096 (select.PIPE_BUF)


class AccessLog:
    """One line per request on stderr, text or JSON, with the request id. Written directly rather
    than through `logging` (a LogRecord per request costs about as much as routing the request),
    and buffered like nginx's `access_log ... flush=`: lines reach stderr together at most
    `flush_seconds` after the first of them (0: each at once), when 256 are waiting, and at shutdown.
    A few writes per batch instead of one per request (stderr flushes every line)."""

    MAX_LINES = 256

    def __init__(self, log_format: str, flush_seconds: float = 1.0) -> None:
        self.json = log_format == "json"
        self.flush_seconds = flush_seconds
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def write(self, client: str | None, method: str, path: str, status: int, seconds: float, version: str,
              request_id: str) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not once a request
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = f"{self._stamp}.{int(now * 1000) % 1000:03d}Z"
        ms = round(seconds * 1000, 3)
        if self.json:
            line = json.dumps({"time": stamp, "level": "INFO", "logger": "serving.access", "client": client,
                               "method": method, "path": path, "status": status, "duration_ms": ms,
                               "model_version": version or None, "request_id": request_id}, separators=(",", ":"))
        else:
            line = (f'{stamp} INFO serving.access: {client or "-"} "{method} {path}" {status} {ms:.2f} ms '
                    f"version={version or '-'} request_id={request_id}")
        self._lines.append(line + "\n")
        if self.flush_seconds <= 0 or len(self._lines) >= self.MAX_LINES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.flush_seconds, self.flush)
            except RuntimeError:  # no event loop (a direct call): nothing would flush later
                self.flush()

    def flush(self) -> None:
        """Write the waiting lines now (the timer, a full buffer, the app's shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            # Writes of at most PIPE_BUF bytes, whole lines each: with several uvicorn workers on one
            # stderr pipe (a container's log), such a write is atomic, so lines never interleave.
            chunk: list[str] = []
            size = 0
            for line in lines:
                n = len(line.encode())
                if chunk and size + n > _PIPE_BUF:
                    self._emit(chunk)
                    chunk, size = [], 0
                chunk.append(line)
                size += n
            self._emit(chunk)

    @staticmethod
    def _emit(lines: list[str]) -> None:
        sys.stderr.write("".join(lines))
        sys.stderr.flush()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                               + f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
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
