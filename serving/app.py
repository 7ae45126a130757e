"""The prediction API: `uvicorn serving.app:app` (or `python -m serving`).

The model is loaded once at start-up; `/reload` (or the optional polling) swaps in the version
the alias points at now. The swap replaces one reference, so a request in flight finishes on
the model it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from serving.routes import router
from serving.settings import ServingSettings
from serving.store import ServingError

if TYPE_CHECKING:
    from serving.model import LoadedModel
    from serving.store import Store


class ModelHolder:
    """The current model; `swap` is atomic (one reference assignment)."""

    def __init__(self, uri: str | None, store: Store | None) -> None:
        self.uri = uri  # None: the one registered model with a @champion (Store.default_uri), found at load
        self.store = store
        self.current: LoadedModel | None = None
        self.error: str | None = None
        self._lock = asyncio.Lock()

    async def reload(self, *, force: bool = False) -> tuple[str | None, str | None, bool]:
        """Load the version the URI points at now, if it differs (or force). Returns (old, new, swapped)."""
        from serving.model import load

        async with self._lock:
            if self.store is None:  # a fixed model: /reload and start-up check first, _poll ignores failures
                raise ServingError("this holder has no model store: nothing to reload")
            if self.uri is None:
                self.uri = await asyncio.to_thread(self.store.default_uri)
            old = self.current.resolved.version if self.current else None
            if not force and self.current is not None:
                now = await asyncio.to_thread(self.store.current_version, self.uri)
                if now == old:
                    return old, old, False
            model = await asyncio.to_thread(load, self.uri, self.store)
            self.current = model
            self.error = None
            return old, model.resolved.version, True


def create_app(settings: ServingSettings | None = None, holder: ModelHolder | None = None) -> FastAPI:
    """The app; tests pass a holder with a model already in it."""
    settings = settings or ServingSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.holder is None:
            from serving.store import Store

            app.state.holder = ModelHolder(settings.serving_model_uri, Store.at(settings))
        h = app.state.holder
        if h.current is None and h.store is not None:
            try:
                await h.reload(force=True)
            except ServingError as e:
                h.error = str(e)  # /ready says why; /health stays up so the orchestrator can see it
        poller = asyncio.create_task(_poll(h, settings.serving_poll_seconds)) if settings.serving_poll_seconds else None
        yield
        if poller is not None:
            poller.cancel()

    app = FastAPI(title="Workbench model API", version="1", lifespan=lifespan,
                  description="Predictions from a registered model (SERVING_MODEL_URI, e.g. models:/<name>@champion).")
    app.state.holder = holder
    app.state.settings = settings

    app.include_router(router)
    app.add_middleware(BodyLimit, limit=settings.serving_max_body_bytes)
    return app


class BodyLimit:
    """413 for a body over the limit, by its Content-Length or as it streams in (plain ASGI: the
    BaseHTTPMiddleware decorator costs a task and a queue per request)."""

    def __init__(self, app, limit: int) -> None:
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


async def _poll(holder: ModelHolder, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        with contextlib.suppress(Exception):  # a failed poll keeps the current model; the next one retries
            await holder.reload()


app = create_app()
