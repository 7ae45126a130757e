"""The Open Inference Protocol (KServe v2) over REST, beside `/predict`.

    GET  /v2                                    server metadata
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]       model metadata (inputs, outputs)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Inputs: one tensor per raw column, named after it (FP32/FP64/INT*, BOOL for a table's boolean
columns, BYTES for its categorical ones), or, for an all-numeric model, one FP32 tensor
[N, n_features]. Outputs: `probabilities` (FP32 [N, classes]) and `label` for classification,
`prediction` (FP32 [N]) for regression. Tensor data may come as JSON or in the binary tensor data
extension (Triton's, the default of `tritonclient`); outputs are binary when asked
(`binary_data_output`, or `binary_data` on a requested output). The route without a version
answers with the champion; `/versions/{v}` with any version this server holds. Errors are
`{"error": "..."}` with 400 (bad request), 404 (unknown model or version), 413 or 503.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic_core import from_json, to_json

from serving.middleware import FAST
from serving.model import InvalidInput, LoadedModel
from serving.routes import observe_rows
from serving.versions import Served

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])
SERVER = {"name": "keras-optuna-workbench", "version": "1", "extensions": ["binary_tensor_data"]}
_HEADER_LENGTH = "inference-header-content-length"
_NUMPY = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
          "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32,
          "FP64": np.float64}
_KIND_TYPE = {"numeric": "FP32", "boolean": "BOOL", "categorical": "BYTES"}
_NUMBERS, _BOOLS = {int, float, type(None)}, {bool}  # JSON values a tensor may hold (null: missing)


class OipError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(e: OipError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.status)


def _now(request: Request) -> Served:
    models = request.app.state.models
    if models is None or models.served is None:
        raise OipError(503, f"no model loaded{': ' + models.error if models is not None and models.error else ''}")
    return models.served


def _model(request: Request, name: str, version: str | None) -> LoadedModel:
    now = _now(request)
    if name != now.name:
        raise OipError(404, f"model {name!r} is not served here; this server serves {now.name!r}")
    if version is None:
        return now.champion
    model = now.version(version)
    if model is None:
        raise OipError(404, f"version {version!r} of {name!r} is not loaded here; loaded: {', '.join(sorted(now.versions)) or 'none'}")
    return model


# -- health and metadata ---------------------------------------------------------------
@router.get("")
async def server_metadata() -> dict[str, Any]:
    return SERVER


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def server_ready(request: Request) -> Response:
    models = request.app.state.models
    ready = models is not None and models.served is not None
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def _metadata(model: LoadedModel, name: str, versions: Sequence[str]) -> dict[str, Any]:
    if model.table is not None:
        inputs = [{"name": c.name, "datatype": _KIND_TYPE[c.kind], "shape": [-1]} for c in model.table.columns]
    else:
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, model.n_features]}]
    return {"name": name, "versions": list(versions), "platform": "keras", "inputs": inputs,
            "outputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in _output_specs(model)],
            "parameters": {"task": model.task, "feature_names": model.feature_names,
                           "named_inputs": "one tensor per feature, named after it, is accepted too"
                           if model.table is None else "one tensor per raw column"}}


def _output_specs(model: LoadedModel) -> list[tuple[str, str, list[int]]]:
    if model.task == "regression":
        return [("prediction", "FP32", [-1])]
    return [("probabilities", "FP32", [-1, len(model.classes)]), ("label", _label_type(model.classes), [-1])]


def _label_type(labels: Sequence[Any]) -> str:
    return "INT64" if all(isinstance(v, int) and not isinstance(v, bool) for v in labels) else "BYTES"


def _register_model_routes(prefix: str) -> None:
    @router.get(prefix, name=f"model metadata {prefix}")
    async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
        try:
            model = _model(request, name, version)
        except OipError as e:
            return _error(e)
        versions = sorted(_now(request).versions, key=lambda v: int(v) if v.isdigit() else 0)
        return JSONResponse(_metadata(model, name, [version] if version else versions))

    @router.get(f"{prefix}/ready", name=f"model ready {prefix}")
    async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
        try:
            _model(request, name, version)
        except OipError as e:
            return _error(e)
        return JSONResponse({"name": name, "ready": True})

    @router.post(f"{prefix}/infer", name=f"infer {prefix}", openapi_extra={FAST: True})
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        try:
            model = _model(request, name, version)
            body = await request.body()
            header, tensors = _parse(body, request.headers.get(_HEADER_LENGTH))
            x, kind, raw = _matrix(model, header, tensors, request.app.state.settings.serving_max_rows)
            observe_rows(request, model, len(x))
            predictions, probs = model.predict_arrays(x)
            response = _respond(model, name, header, predictions, probs)
            shadow, now = request.app.state.shadow, _now(request)
            if shadow is not None and version is None and now.challenger is not None and now.champion is model:
                shadow.offer(now, kind, raw, predictions.tolist())  # scored later, off this request's path
            return response
        except OipError as e:
            return _error(e)
        except InvalidInput as e:
            return _error(OipError(400, str(e)))


_register_model_routes("/models/{name}")
_register_model_routes("/models/{name}/versions/{version}")


# -- request decoding ------------------------------------------------------------------
def _parse(body: bytes, header_length: str | None) -> tuple[dict[str, Any], list[tuple[str, np.ndarray | list]]]:
    """(the JSON header, [(input name, values as a flat array or list)])."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise OipError(400, f"Inference-Header-Content-Length {header_length!r} does not fit a body of {len(body)} bytes")
        n = int(header_length)
        text, binary = body[:n], body[n:]
    else:
        text, binary = body, b""
    try:
        header = from_json(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise OipError(400, f"the request is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise OipError(400, "inputs: must be a non-empty list of tensors")
    offset = 0
    tensors: list[tuple[str, np.ndarray | list]] = []
    for i, spec in enumerate(header["inputs"]):
        if not isinstance(spec, dict):
            raise OipError(400, f"inputs.{i}: must be an object with name, shape, datatype, data")
        name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
        if not isinstance(name, str) or not name:
            raise OipError(400, f"inputs.{i}.name: must be a non-empty string")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise OipError(400, f"inputs.{i} ({name}).shape: must be a list of non-negative integers, got {shape!r}")
        if datatype != "BYTES" and datatype not in _NUMPY:
            raise OipError(400, f"inputs.{i} ({name}).datatype: must be one of BOOL, INT8..INT64, UINT8..UINT64, "
                           f"FP16, FP32, FP64, BYTES, got {datatype!r}")
        count = math.prod(shape)
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise OipError(400, f"inputs.{i} ({name}).parameters.binary_data_size: {size!r} is past the end of the body")
            chunk = binary[offset:offset + size]
            offset += size
            values: np.ndarray | list = _from_binary(chunk, datatype, count, f"inputs.{i} ({name})")
        else:
            if "data" not in spec:
                raise OipError(400, f"inputs.{i} ({name}).data: missing (and no binary_data_size)")
            values = _flatten(spec["data"])
            if len(values) != count:
                raise OipError(400, f"inputs.{i} ({name}): shape {shape} holds {count} values, data has {len(values)}")
        if datatype == "BYTES":
            bad = next((j for j, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
            if bad is not None:
                raise OipError(400, f"inputs.{i} ({name}).data[{bad}]: a BYTES tensor holds strings (or null: "
                               f"missing), got {values[bad]!r}")
        tensors.append((name, values if datatype == "BYTES" else _typed(values, datatype, f"inputs.{i} ({name})")))
        spec["_shape"] = shape
        spec["_type"] = datatype
    if offset != len(binary):
        raise OipError(400, f"{len(binary) - offset} bytes of binary data after the last input")
    return header, tensors


def _flatten(data: Any) -> list:
    """A tensor's JSON data, flat or nested, as a flat row-major list."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):  # flat (a list deeper in is refused as a value)
        return data
    out: list = []
    for v in data:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


def _typed(values: np.ndarray | list, datatype: str, key: str) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    allowed = _BOOLS if datatype == "BOOL" else _NUMBERS
    if not set(map(type, values)) <= allowed:  # one C-level pass; only a bad tensor is walked to name the value
        j, v = next((j, v) for j, v in enumerate(values) if type(v) not in allowed)
        raise OipError(400, f"{key}.data[{j}]: a {datatype} tensor holds {'booleans' if datatype == 'BOOL' else 'numbers'}"
                       f", got {v!r}")
    if datatype == "BOOL":
        return np.asarray(values, dtype=np.bool_)
    if None in values:  # null: a missing value (a table model fills it)
        return np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    try:
        with np.errstate(over="ignore"):  # out of FP32's range: inf, refused as not finite
            return np.asarray(values, dtype=_NUMPY[datatype])
    except (OverflowError, ValueError) as e:
        raise OipError(400, f"{key}.data: does not fit {datatype}: {e}") from None


def _from_binary(chunk: bytes, datatype: str, count: int, key: str) -> np.ndarray | list:
    if datatype == "BYTES":
        out: list = []
        pos = 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise OipError(400, f"{key}: truncated BYTES element length at byte {pos}")
            (n,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            if pos + n > len(chunk):
                raise OipError(400, f"{key}: BYTES element {len(out)} runs past its data")
            try:
                out.append(chunk[pos:pos + n].decode())
            except UnicodeDecodeError:
                raise OipError(400, f"{key}: BYTES element {len(out)} is not UTF-8") from None
            pos += n
        if len(out) != count:
            raise OipError(400, f"{key}: the shape holds {count} values, the binary data {len(out)}")
        return out
    dtype = np.dtype(_NUMPY[datatype]).newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise OipError(400, f"{key}: the shape holds {count} {datatype} values ({count * dtype.itemsize} bytes), "
                       f"the binary data has {len(chunk)} bytes")
    return np.frombuffer(chunk, dtype=dtype)


def _matrix(model: LoadedModel, header: dict[str, Any], tensors: list[tuple[str, np.ndarray | list]],
            limit: int) -> tuple[np.ndarray, str, Any]:
    """The model's input matrix from the request's tensors, and the raw rows as the shadow
    challenger takes them: ("array", the numeric matrix) or ("records", [{column: value}])."""
    specs = header["inputs"]
    if len(tensors) == 1 and model.table is None and len(specs[0]["_shape"]) == 2:
        name, values = tensors[0]
        rows, width = specs[0]["_shape"]
        if width != model.n_features:
            raise OipError(400, f"inputs.0 ({name}): shape [N, {model.n_features}] expected (one column per feature: "
                           f"{', '.join(model.feature_names[:5])}{', ...' if model.n_features > 5 else ''}), got {specs[0]['_shape']}")
        if specs[0]["_type"] == "BYTES" or specs[0]["_type"] == "BOOL":
            raise OipError(400, f"inputs.0 ({name}).datatype: this model takes numbers (FP32), got {specs[0]['_type']}")
        _check_rows(rows, limit)
        x = model.rows_from_array(np.asarray(values, dtype=np.float32).reshape(rows, width), "inputs.0")
        return x, "array", x
    by_name = {name: (i, values) for i, (name, values) in enumerate(tensors)}
    if len(by_name) != len(tensors):
        raise OipError(400, "inputs: each tensor name may appear once")
    expected = model.feature_names
    missing, unknown = [n for n in expected if n not in by_name], [n for n in by_name if n not in set(expected)]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []) + (
            [f"unknown {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"] if unknown else [])
        raise OipError(400, f"inputs: tensor names must be the model's feature names (or one FP32 tensor [N, "
                       f"{model.n_features}] for an all-numeric model): {'; '.join(parts)}")
    rows = None
    for name in expected:
        i, values = by_name[name]
        shape = specs[i]["_shape"]
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise OipError(400, f"inputs.{i} ({name}).shape: must be [N] or [N, 1], got {shape}")
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise OipError(400, f"inputs.{i} ({name}).shape: {shape[0]} rows, the first input has {rows}")
    assert rows is not None
    _check_rows(rows, limit)
    if model.table is None:
        columns = []
        for name in expected:
            i, values = by_name[name]
            if specs[i]["_type"] in ("BYTES", "BOOL"):
                raise OipError(400, f"inputs.{i} ({name}).datatype: this model takes numbers, got {specs[i]['_type']}")
            columns.append(np.asarray(values, dtype=np.float32))
        x = model.rows_from_array(np.stack(columns, axis=1), "inputs")
        return x, "array", x
    kinds = {c.name: c.kind for c in model.table.columns}
    for name in expected:  # the datatype must suit the column; the values are judged by the encoding
        i, _ = by_name[name]
        datatype = specs[i]["_type"]
        if kinds[name] == "numeric" and datatype in ("BYTES", "BOOL"):
            raise OipError(400, f"inputs.{i} ({name}).datatype: a numeric column takes FP32/FP64/INT*, got {datatype}")
    records: list[dict[str, Any]] = [{} for _ in range(rows)]
    for name in expected:
        _, values = by_name[name]
        for r, v in enumerate(values.tolist() if isinstance(values, np.ndarray) else values):
            records[r][name] = None if isinstance(v, float) and math.isnan(v) else v
    return model.rows_from_records(records), "records", records


def _check_rows(rows: int, limit: int) -> None:
    if rows == 0:
        raise OipError(400, "inputs: must hold at least one row")
    if rows > limit:
        raise OipError(413, f"{rows} rows in one request; the limit is {limit}")


# -- response encoding -----------------------------------------------------------------
def _respond(model: LoadedModel, name: str, header: dict[str, Any], predictions: np.ndarray,
             probs: np.ndarray | None) -> Response:
    n = len(predictions)
    available: dict[str, tuple[str, list[int], np.ndarray | list]] = {}
    if probs is None:
        available["prediction"] = ("FP32", [n], np.asarray(predictions, dtype=np.float32))
    else:
        available["probabilities"] = ("FP32", [n, probs.shape[1]], np.asarray(probs, dtype=np.float32))
        label_type = _label_type(model.classes)
        available["label"] = (label_type, [n], np.asarray(predictions, dtype=np.int64) if label_type == "INT64"
                              else [str(v) for v in predictions])
    params = header.get("parameters")
    if not isinstance(params, dict):
        params = {}
    all_binary = bool(params.get("binary_data_output"))
    requested = header.get("outputs")
    if requested is None:
        wanted = [(k, all_binary) for k in available]
    else:
        if not isinstance(requested, list):
            raise OipError(400, "outputs: must be a list of {name}")
        wanted = []
        for i, spec in enumerate(requested):
            out_name = spec.get("name") if isinstance(spec, dict) else None
            if out_name not in available:
                raise OipError(400, f"outputs.{i}.name: must be one of {', '.join(available)}, got {out_name!r}")
            p = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
            wanted.append((out_name, bool(p.get("binary_data", all_binary))))
    outputs, blobs = [], []
    for out_name, binary in wanted:
        datatype, shape, values = available[out_name]
        entry: dict[str, Any] = {"name": out_name, "datatype": datatype, "shape": shape}
        if binary:
            blob = _to_binary(values, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.ravel().tolist() if isinstance(values, np.ndarray) else values
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": name, "model_version": model.resolved.version or "", "outputs": outputs}
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    text = to_json(body)
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(b"".join([text, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})


def _to_binary(values: np.ndarray | list, datatype: str) -> bytes:
    if datatype == "BYTES":
        assert isinstance(values, list)
        return b"".join(struct.pack("<I", len(b)) + b for b in (str(v).encode() for v in values))
    assert isinstance(values, np.ndarray)
    return np.ascontiguousarray(values, dtype=np.dtype(_NUMPY[datatype]).newbyteorder("<")).tobytes()
