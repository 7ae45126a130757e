"""Routes: /predict, /health, /ready, /model, /reload."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException, Request, Response

from serving.model import InvalidInput, LoadedModel
from serving.schemas import ModelInfo, PredictRequest, PredictResponse, ReloadResponse
from serving.store import ServingError

router = APIRouter()


def current_model(request: Request) -> LoadedModel:
    holder = request.app.state.holder
    if holder is None or holder.current is None:
        raise HTTPException(503, detail=f"no model loaded{': ' + holder.error if holder is not None and holder.error else ''}")
    return holder.current


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, request: Request) -> Response:
    """Score rows with the current model."""
    model = current_model(request)  # this request keeps this model even if a reload swaps it
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
    # Serialised here, not by FastAPI's response-model pass: the schema above documents it.
    result = {"model_name": model.resolved.name, "model_version": model.resolved.version, "probabilities": None,
              "classes": None, **model.predict(x)}
    return Response(json.dumps(result, separators=(",", ":")), media_type="application/json")


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up (whether or not a model is loaded)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, str | None]:
    """A model is loaded and answering."""
    model = current_model(request)
    return {"status": "ready", "version": model.resolved.version}


@router.get("/model", response_model=ModelInfo)
async def model_info(request: Request) -> ModelInfo:
    """Which model answers: name, version, alias, signature, test metrics, trial params."""
    m = current_model(request)
    r = m.resolved
    return ModelInfo(uri=r.uri, name=r.name, version=r.version, alias=r.alias, run_id=r.run_id, task=m.task,
                     feature_names=m.feature_names, class_labels=m.class_labels, input_shape=[None, m.input_width],
                     columns=None if m.table is None else [
                         {"name": c.name, "kind": c.kind, "missing_rate": round(c.missing_rate, 4),
                          **({"levels": len(c.levels)} if c.kind == "categorical" else {})} for c in m.table.columns],
                     loaded_at=m.loaded_at, details=m.info)


@router.post("/reload", response_model=ReloadResponse)
async def reload(request: Request) -> ReloadResponse:
    """Load the version the alias points at now (no restart); in-flight requests are not disturbed."""
    holder = request.app.state.holder
    if holder is None or holder.store is None:
        raise HTTPException(409, detail="this server was started with a fixed model; nothing to reload")
    try:
        old, new, swapped = await holder.reload()
    except ServingError as e:
        raise HTTPException(503, detail=f"reload failed, still serving the previous model: {e}") from None
    return ReloadResponse(previous_version=old, version=new, reloaded=swapped)
