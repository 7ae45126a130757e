"""Routes: /predict, /health, /ready, /model, /reload, /metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic_core import to_json

from serving.auth import require_admin
from serving.metrics import CONTENT_TYPE
from serving.middleware import FAST, ROWS_KEY, VERSION_KEY
from serving.model import InvalidInput, LoadedModel
from serving.schemas import LoadedVersion, ModelInfo, PredictRequest, PredictResponse, ReloadResponse
from serving.store import ServingError
from serving.versions import Served

router = APIRouter()


def served(request: Request) -> Served:
    """What answers now (one snapshot: a reload during this request does not change it), or 503."""
    models = request.app.state.models
    if models is None or models.served is None:
        raise HTTPException(503, detail=f"no model loaded{': ' + models.error if models is not None and models.error else ''}")
    return models.served


def observe_rows(request: Request, model: LoadedModel, rows: int) -> None:
    """Tell the access log and metrics (serving.middleware.Observe) which version answered, and
    how many rows."""
    scope = request.scope
    scope[VERSION_KEY] = model.resolved.version or ""
    scope[ROWS_KEY] = rows


# The body is read and validated here (pydantic's JSON parser, in one pass) rather than by a body
# parameter, so that FastLane (serving.middleware) can call this endpoint directly: FastAPI's own
# body handling costs about as much as the whole prediction of one row. The OpenAPI schema still
# documents the body; a bad one is the same 422 FastAPI would give.
_PREDICT_BODY = {FAST: True, "requestBody": {"required": True, "content": {"application/json": {
    "schema": PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


def _jsonable(error: Mapping[str, Any]) -> dict[str, Any]:
    """A pydantic error as FastAPI reports a body error; raw input bytes (a body that is not even
    UTF-8) become text, or the error handler itself would fail on them."""
    out = {**error, "loc": ("body", *error["loc"])}
    if isinstance(out.get("input"), bytes):
        out["input"] = out["input"].decode(errors="replace")
    return out


@router.post("/predict", response_model=PredictResponse, openapi_extra=_PREDICT_BODY)
async def predict(request: Request) -> Response:
    """Score rows with the champion: `{"instances": [[...]]}` or `{"records": [{...}]}`."""
    try:
        body = PredictRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError([_jsonable(err) for err in e.errors(include_url=False)]) from None
    now = served(request)
    model = now.champion
    limit = request.app.state.settings.serving_max_rows
    rows = body.instances if body.instances is not None else body.records
    assert rows is not None  # PredictRequest's validator: exactly one of instances and records
    if len(rows) > limit:
        raise HTTPException(413, detail=f"{len(rows)} rows in one request; the limit is {limit}")
    try:
        if body.instances is not None:
            x = model.rows_from_instances(body.instances)
        else:
            assert body.records is not None  # as above: a body without instances has records
            x = model.rows_from_records(body.records)
    except InvalidInput as e:
        raise HTTPException(422, detail=str(e)) from None
    observe_rows(request, model, len(x))
    answer = model.predict(x)
    shadow = request.app.state.shadow
    if shadow is not None and now.challenger is not None:  # scored later, off this request's path
        shadow.offer(now, "instances" if body.instances is not None else "records", rows, answer["predictions"])
    # Serialised here, not by FastAPI's response-model pass: the schema above documents it.
    result = {"model_name": model.resolved.name, "model_version": model.resolved.version, "probabilities": None,
              "classes": None, **answer}
    return Response(to_json(result), media_type="application/json",
                    headers={"x-model-version": model.resolved.version or ""})


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up (whether or not a model is loaded)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, str | None]:
    """A model is loaded and answering."""
    return {"status": "ready", "version": served(request).champion.resolved.version}


@router.get("/model", response_model=ModelInfo)
async def model_info(request: Request) -> ModelInfo:
    """Which model answers (name, version, alias, signature, test metrics, trial params) and
    every version this server holds."""
    now = served(request)
    m = now.champion
    r = m.resolved
    return ModelInfo(uri=r.uri, name=r.name, version=r.version, alias=r.alias, run_id=r.run_id, task=m.task,
                     feature_names=m.feature_names, class_labels=m.class_labels, input_shape=[None, m.input_width],
                     columns=None if m.table is None else [
                         {"name": c.name, "kind": c.kind, "missing_rate": round(c.missing_rate, 4),
                          **({"levels": len(c.levels)} if c.kind == "categorical" else {})} for c in m.table.columns],
                     loaded_at=m.loaded_at, details=m.info,
                     loaded=[LoadedVersion(version=v, role=role, run_id=now.versions[v].resolved.run_id if v in now.versions
                                           else r.run_id) for role, (_, v) in now.roles().items()])


@router.post("/reload", response_model=ReloadResponse, dependencies=[Depends(require_admin)])
async def reload(request: Request) -> ReloadResponse:
    """Load the versions the aliases point at now (no restart); in-flight requests are not disturbed."""
    models = request.app.state.models
    if models is None or models.store is None:
        raise HTTPException(409, detail="this server was started with a fixed model; nothing to reload")
    try:
        outcome = await models.reload()
    except ServingError as e:
        raise HTTPException(503, detail=f"reload failed, still serving the previous model: {e}") from None
    return ReloadResponse(previous_version=outcome.previous_version, version=outcome.version, reloaded=outcome.reloaded)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format (SERVING_METRICS=false turns it off)."""
    m = request.app.state.metrics
    if m is None:
        raise HTTPException(404, detail="metrics are off (SERVING_METRICS=false)")
    return Response(m.exposition(), media_type=CONTENT_TYPE)
