"""The prediction API: `uvicorn serving.app:app` (or `python -m serving`).

The models are loaded once at start-up (serving.versions); `/reload` (or the optional polling)
swaps in the versions the aliases point at now, without disturbing requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from serving import logs
from serving.metrics import Metrics
from serving.middleware import BodyLimit, FastLane, Observe
from serving.oip import router as oip_router
from serving.routes import router
from serving.settings import ServingSettings
from serving.shadow import Shadow
from serving.store import ServingError
from serving.versions import ModelSet


def create_app(settings: ServingSettings | None = None, models: ModelSet | None = None, shadow: Shadow | None = None) -> FastAPI:
    """The app; tests pass a model set already loaded (ModelSet.fixed), and may pass the shadow."""
    settings = settings or ServingSettings()
    metrics = Metrics() if settings.serving_metrics else None
    access = (logs.AccessLog(settings.serving_log_format, settings.serving_access_log_flush_seconds)
              if settings.serving_access_log else None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure(settings.serving_log_format)
        if app.state.models is None:
            from serving.store import Store

            app.state.models = ModelSet(settings.serving_model_uri, Store.at(settings),
                                        shadow_alias=settings.serving_shadow_alias,
                                        pinned=settings.serving_model_versions, metrics=metrics)
        held: ModelSet = app.state.models
        held.metrics = metrics
        if held.served is None and held.store is not None:
            try:
                await held.reload(force=True)
            except ServingError as e:
                held.error = str(e)  # /ready says why; /health stays up so the orchestrator can see it
        elif held.served is not None and metrics is not None:
            metrics.set_models(held.served.roles())
        if app.state.shadow is None and settings.serving_shadow_alias and held.store is not None:
            app.state.shadow = Shadow(settings.serving_shadow_fraction, metrics=metrics, store=held.store,
                                      log_seconds=settings.serving_shadow_log_seconds)
        if app.state.shadow is not None:
            app.state.shadow.metrics = metrics
            app.state.shadow.start()
        poller = asyncio.create_task(_poll(held, settings.serving_poll_seconds)) if settings.serving_poll_seconds else None
        yield
        if poller is not None:
            poller.cancel()
        if app.state.shadow is not None:
            await app.state.shadow.stop()  # the last shadow evidence reaches MLflow
        if access is not None:
            access.flush()

    app = ServingApp(title="Workbench model API", version="1", lifespan=lifespan,
                  description="Predictions from a registered model (SERVING_MODEL_URI, e.g. models:/<name>@champion); "
                  "the Open Inference Protocol (v2) beside them.")
    app.state.models = models
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.shadow = shadow

    app.include_router(router)
    app.include_router(oip_router)
    # Every HTTP request: Observe (request id, access log, metrics; sees the 413s) -> BodyLimit ->
    # FastLane (the prediction routes, called directly) or, for every other route, FastAPI itself.
    lane = FastLane(app.fastapi_call, routes=[*router.routes, *oip_router.routes])
    app.entry = Observe(BodyLimit(lane, limit=settings.serving_max_body_bytes), metrics=metrics, access=access)
    return app


class ServingApp(FastAPI):
    """FastAPI, entered through `entry` for HTTP: the prediction routes never pass FastAPI's and
    Starlette's per-request layers (telemetry, body limit, error middleware, routing), which cost
    about a tenth of a one-row prediction. An error those routes do not handle still becomes a 500
    (uvicorn's, as Starlette's error middleware would send) and is counted and logged by Observe."""

    entry: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.entry is not None:
            scope["app"] = self  # what Starlette sets: request.app
            await self.entry(scope, receive, send)
        else:  # lifespan (and websockets, which this API has none of)
            await super().__call__(scope, receive, send)

    async def fastapi_call(self, scope: Any, receive: Any, send: Any) -> None:
        """Every route but the fast ones: FastAPI's own stack."""
        await super().__call__(scope, receive, send)


async def _poll(models: ModelSet, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        with contextlib.suppress(Exception):  # a failed poll keeps the current models; the next one retries
            await models.reload()


app = create_app()
