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

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.registry import ServingError
from serving.routes import router
from serving.settings import ServingSettings

if TYPE_CHECKING:
    from serving.model import LoadedModel
    from serving.registry import Store


class ModelHolder:
    """The current model; `swap` is atomic (one reference assignment)."""

    def __init__(self, uri: str, store: Store | None) -> None:
        self.uri = uri
        self.store = store
        self.current: LoadedModel | None = None
        self.error: str | None = None
        self._lock = asyncio.Lock()

    async def reload(self, *, force: bool = False) -> tuple[str | None, str | None, bool]:
        """Load the version the URI points at now, if it differs (or force). Returns (old, new, swapped)."""
        from serving.model import load

        async with self._lock:
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
            from serving.registry import Store

            app.state.holder = ModelHolder(settings.serving_model_uri, Store(settings.tracking_uri()))
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
                  description="Predictions from the registered model (models:/<name>@champion by default).")
    app.state.holder = holder
    app.state.settings = settings

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.serving_max_body_bytes:
            return JSONResponse({"detail": f"request body is {length} bytes; the limit is {settings.serving_max_body_bytes}"},
                                status_code=413)
        return await call_next(request)

    app.include_router(router)
    return app


async def _poll(holder: ModelHolder, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        with contextlib.suppress(Exception):  # a failed poll keeps the current model; the next one retries
            await holder.reload()


app = create_app()
