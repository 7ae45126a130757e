"""Plain ASGI middleware of the API (no BaseHTTPMiddleware: it costs a task and a queue per request).

`Observe`: a request id (`X-Request-ID`, generated when absent, echoed), the access log line and
the request metrics. `BodyLimit`: 413 for a body over the limit. `FastLane`: the prediction
endpoints called without FastAPI's per-request machinery.
"""

from __future__ import annotations

import random
import time
from typing import Any

from fastapi import HTTPException
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from serving.logs import AccessLog
from serving.metrics import Metrics

# Prediction routes put the version that answered and the rows they scored here (the same scope
# dict reaches the middleware).
VERSION_KEY = "workbench.model_version"
ROWS_KEY = "workbench.rows"
_REQUEST_ID = b"x-request-id"
_MAX_ID = 200  # a client's id longer than this (or not printable ASCII) is replaced
_random_bits = random.getrandbits


class Observe:
    def __init__(self, app: Any, metrics: Metrics | None, access: AccessLog | None) -> None:
        self.app, self.access = app, access
        self.observe = metrics.observe if metrics is not None else None

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
            # uuid4().hex's form from the process's PRNG (reseeded in forked workers): an id needs to
            # be unique, not secret, and os.urandom costs a system call per request.
            request_id = b"%032x" % _random_bits(128)
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
            if self.observe is not None:
                self.observe(template, status, version, seconds, scope.get(ROWS_KEY))
            if self.access is not None:
                client = scope.get("client")
                self.access.write(client[0] if client else None, scope["method"], scope["path"], status, seconds, version,
                                  request_id.decode())


class BodyLimit:
    """413 for a body over the limit, by its Content-Length or as it streams in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared, chunked = None, False
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit():
                if int(value) > self.limit:
                    return await self._refuse(scope, receive, send, value.decode())
                declared = value
            elif key == b"transfer-encoding":
                chunked = True  # it beats Content-Length (RFC 9112 6.3): count as the body streams
        if declared is not None and not chunked:  # the server reads exactly Content-Length bytes
            return await self.app(scope, receive, send)
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


class FastLane:
    """Calls the POST endpoints marked `fast` (the prediction routes) straight from ASGI, skipping
    FastAPI's routing, dependency solving and body parsing, which together cost about as much as
    scoring one row. Those endpoints take only the request and their path parameters and read and
    validate their own body, so they behave the same either way (the OpenAPI schema documents
    them as usual); their errors are rendered by FastAPI's own exception handlers."""

    def __init__(self, app: Any, routes: list[Any]) -> None:
        self.app = app
        self.lanes = [r for r in routes if isinstance(r, APIRoute) and "POST" in (r.methods or ()) and (r.openapi_extra or {}).get(FAST)]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        for route in self.lanes:
            match = route.path_regex.match(path)
            if match is not None:
                break
        else:
            return await self.app(scope, receive, send)
        params = match.groupdict()
        scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, params
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request, **params)
        except HTTPException as e:
            response = await http_exception_handler(request, e)
        except RequestValidationError as e:
            response = await request_validation_exception_handler(request, e)
        await response(scope, receive, send)


FAST = "x-workbench-fast-lane"  # openapi_extra key that marks an endpoint for FastLane
