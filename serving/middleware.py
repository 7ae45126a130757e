"""Plain ASGI middleware of the API (no BaseHTTPMiddleware: it costs a task and a queue per request).

`Observe`: a request id (`X-Request-ID`, generated when absent, echoed), the access log line and
the request metrics. `BodyLimit`: 413 for a body over the limit.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from serving.logs import ACCESS
from serving.metrics import Metrics

# Routes put the version that answered here (the same scope dict reaches the middleware).
VERSION_KEY = "workbench.model_version"
_REQUEST_ID = b"x-request-id"
_MAX_ID = 200  # a client's id longer than this (or not printable ASCII) is replaced


class Observe:
    def __init__(self, app: Any, metrics: Metrics | None, access_log: bool) -> None:
        self.app, self.metrics, self.access_log = app, metrics, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = None
        for key, value in scope["headers"]:
            if key == _REQUEST_ID:
                if 0 < len(value) <= _MAX_ID and value.isascii() and value.decode().isprintable():
                    request_id = value
                break
        if request_id is None:
            request_id = uuid.uuid4().hex.encode()
        status = 500  # what the client gets if the app fails before it starts a response

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_REQUEST_ID, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = route.path if route is not None else "(unmatched)"
            version = scope.get(VERSION_KEY, "")
            if self.metrics is not None:
                self.metrics.observe_request(template, status, version, seconds)
            if self.access_log and ACCESS.isEnabledFor(logging.INFO):
                client = scope.get("client")
                path = scope["path"]
                ACCESS.info('%s "%s %s" %d %.2f ms version=%s request_id=%s', client[0] if client else "-",
                            scope["method"], path, status, seconds * 1000, version or "-", request_id.decode(),
                            extra={"client": client[0] if client else None, "method": scope["method"], "path": path,
                                   "status": status, "duration_ms": round(seconds * 1000, 3),
                                   "model_version": version or None, "request_id": request_id.decode()})


class BodyLimit:
    """413 for a body over the limit, by its Content-Length or as it streams in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._refuse(scope, receive, send, value.decode())
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _TooLarge:
            return await self._refuse(scope, receive, send, f"more than {self.limit}")

    async def _refuse(self, scope, receive, send, size: str) -> None:
        response = JSONResponse({"detail": f"request body is {size} bytes; the limit is {self.limit}"}, status_code=413)
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass
