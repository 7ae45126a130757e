"""The prediction API with FastAPI's TestClient and a small real Keras model; every bad input."""

from __future__ import annotations

import asyncio
import json

import keras
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import FAMILIES, load_dataset
from models.training import fit
from serving.app import create_app
from serving.middleware import BodyLimit
from serving.model import from_directory
from serving.settings import ServingSettings
from serving.store import ResolvedModel
from serving.versions import ModelSet
from studies.tracking import save_model


def _served(dataset: str, tmp_path_factory):
    data = load_dataset(name=dataset, seed=0)
    keras.utils.set_random_seed(0)
    model = FAMILIES["mlp"].build({"units": [8]}, data.spec)
    fit(model, data, epochs=1, batch_size=64)
    path = save_model(model, data.spec, {"optuna.study_name": "t", "optuna.trial_number": "0"})
    loaded = from_directory(path, ResolvedModel("models:/t@champion", "t", "1", "champion", "run1",
                                                {"workbench.test_loss": "0.1", "workbench.trial_number": "0"}))
    settings = ServingSettings(serving_max_rows=50, serving_max_body_bytes=200_000)
    return TestClient(create_app(settings, ModelSet.fixed(loaded))), model, data


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    client, model, data = _served("breast_cancer", tmp_path_factory)
    with client:
        yield client, model, data


def test_instances_and_records_give_the_model_s_answer(binary):
    client, model, data = binary
    rows = data.x_test[:5]
    r = client.post("/predict", json={"instances": rows.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "t" and body["model_version"] == "1"
    expected = np.asarray(model(rows)).ravel()
    np.testing.assert_allclose([p[1] for p in body["probabilities"]], expected, atol=1e-5)
    assert body["classes"] == list(data.spec.class_labels)
    assert body["predictions"] == [data.spec.class_labels[int(p > 0.5)] for p in expected]
    records = [dict(zip(data.spec.feature_names, map(float, row), strict=True)) for row in rows]
    assert client.post("/predict", json={"records": records}).json() == body


def test_health_ready_model(binary):
    client, _, data = binary
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "version": "1"}
    info = client.get("/model").json()
    assert info["alias"] == "champion" and info["input_shape"] == [None, 30]
    assert info["feature_names"] == list(data.spec.feature_names) and info["details"]["test_loss"] == "0.1"
    assert client.post("/reload").status_code == 409  # a fixed model has no alias to follow


def _row(data, **changes):
    return dict(zip(data.spec.feature_names, map(float, data.x_test[0]), strict=True)) | changes


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"instances": [[1.0, 2.0]]}, 422, "instances.0: the model expects 30 values"),
        ({"instances": []}, 422, "instances: must hold at least one row"),
        ({"records": []}, 422, "records: must hold at least one row"),
        ({"instances": [["a"] * 30]}, 422, "Input should be a valid number"),
        ({"instances": [["1.5"] * 30]}, 422, "Input should be a valid number"),
        ({"instances": [[None] * 30]}, 422, "Input should be a valid number"),
        ({}, 422, "give exactly one of instances or records"),
        ({"instances": [[0.0] * 30], "records": [{}]}, 422, "give exactly one of instances or records"),
        ({"rows": [[0.0] * 30]}, 422, "Extra inputs are not permitted"),
        ({"instances": [[0.0] * 30] * 51}, 413, "51 rows in one request; the limit is 50"),
        ({"instances": [[0.0] * 30, [0.0] * 29]}, 422, "instances.1: the model expects 30 values (mean radius, mean texture, mean perimeter, mean area, mean smoothness, ...), got 29"),
        ("records-missing", 422, "records.0: feature names do not match the model: missing mean radius"),
        ("records-unknown", 422, "unknown colour"),
        # Records may carry strings, booleans and null for table models; a numeric model still refuses them.
        ("records-string", 422, "records.0: 'mean radius' must be a finite number, got '1.5'"),
        ("records-bool", 422, "records.0: 'mean radius' must be a finite number, got True"),
        ("records-null", 422, "records.0: 'mean radius' must be a finite number, got nan"),
    ],
)
def test_bad_input_is_a_4xx_that_names_the_problem(binary, payload, status, message):
    client, _, data = binary
    if payload == "records-missing":
        row = _row(data)
        row.pop("mean radius")
        payload = {"records": [row]}
    elif payload == "records-unknown":
        payload = {"records": [_row(data, colour=1.0)]}
    elif isinstance(payload, str):
        payload = {"records": [_row(data, **{"mean radius": {"string": "1.5", "bool": True, "null": None}[payload[8:]]})]}
    r = client.post("/predict", json=payload)
    assert r.status_code == status, r.text
    assert message in r.text


def test_nan_and_inf_are_refused(binary):
    client, _, data = binary
    for token in ("NaN", "Infinity", "-Infinity"):
        raw = json.dumps({"instances": [[0.0] * 29 + [0.5]]}).replace("0.5", token)
        r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (token, r.text)
        assert "must be a finite number" in r.text or "valid number" in r.text


@pytest.mark.parametrize("headers, status", [
    ([(b"content-length", b"100")], 200),  # the server reads exactly that many bytes: not counted again
    ([(b"content-length", b"200")], 413),  # declared over the limit: refused before reading
    ([(b"content-length", b"10"), (b"transfer-encoding", b"chunked")], 413),  # chunked wins: counted
    ([], 413),  # no length: counted as it streams
])
def test_body_limit_counts_every_body_whose_length_is_not_fixed(headers, status):
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    chunks = [{"type": "http.request", "body": b"x" * 100, "more_body": i < 2} for i in range(3)]
    sent: list[dict] = []

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    asyncio.run(BodyLimit(app, limit=150)(scope, receive, send))
    assert sent[0]["status"] == status


def test_oversized_body_and_malformed_json(binary):
    client, _, _ = binary
    r = client.post("/predict", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "the limit is 200000" in r.text
    # Without a Content-Length (chunked), the body is counted as it streams in.
    chunks = (b"{" if i == 0 else b" " * 50_000 for i in range(7))
    r = client.post("/predict", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "more than 200000" in r.text, r.text
    r = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    # Seen in CI (schemathesis): a body that is not UTF-8 was a 500.
    r = client.post("/predict", content=b"\xff", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Invalid JSON" in r.text
    r = client.post("/v2/models/t/infer", content=b"\xff", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "the request is not JSON" in r.text


def test_not_ready_without_a_model():
    models = ModelSet.fixed(None)
    models.error = "cannot resolve models:/nothing@champion"
    with TestClient(create_app(ServingSettings(), models)) as client:
        # The lifespan would try to load; a model set without a store reports the error instead.
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and "no model loaded" in r.text
        assert client.post("/predict", json={"instances": [[1.0]]}).status_code == 503


def test_regression_answers_values(tmp_path_factory):
    client, model, data = _served("diabetes", tmp_path_factory)
    with client:
        body = client.post("/predict", json={"instances": data.x_test[:3].tolist()}).json()
    assert body["probabilities"] is None and body["classes"] is None
    np.testing.assert_allclose(body["predictions"], np.asarray(model(data.x_test[:3])).ravel(), rtol=1e-5)
