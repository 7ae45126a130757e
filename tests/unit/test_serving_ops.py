"""What operators need from the API: /metrics, request ids and access logs, the admin token, the
Open Inference Protocol (v2) routes, several versions in one process, shadow scoring. Two small
real Keras models (versions 1 and 2 of one registered name) served with FastAPI's TestClient."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from models import FAMILIES, load_dataset
from models.training import fit
from serving.app import create_app
from serving.logs import AccessLog
from serving.metrics import Metrics, RequestSeries
from serving.model import from_directory
from serving.settings import ServingSettings
from serving.shadow import Shadow, read_evidence
from serving.store import ResolvedModel, Store
from serving.versions import ModelSet
from studies.tracking import save_model


@pytest.fixture(scope="module")
def two_versions():
    """(data, [version 1, version 2]) of one registered name `t`."""
    data = load_dataset(name="breast_cancer", seed=0)
    versions = []
    for version, seed in (("1", 0), ("2", 3)):
        keras.utils.set_random_seed(seed)
        model = FAMILIES["mlp"].build({"units": [8]}, data.spec)
        fit(model, data, epochs=1, batch_size=64)
        path = save_model(model, data.spec, {"optuna.study_name": "t", "optuna.trial_number": version})
        versions.append(from_directory(path, ResolvedModel(f"models:/t/{version}", "t", version, None, f"run{version}")))
    return data, versions


def app_client(two_versions, *, shadow: Shadow | None = None, challenger: bool = True, **settings) -> TestClient:
    _, (v1, v2) = two_versions
    models = ModelSet.fixed(v1, challenger=v2 if challenger else None, pinned=[] if challenger else [v2])
    return TestClient(create_app(ServingSettings(**settings), models, shadow=shadow))


def samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    return parse_samples(client.get("/metrics").text)


def parse_samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_rows_versions_and_loaded_models(two_versions):
    data, _ = two_versions
    with app_client(two_versions) as client:
        assert client.post("/predict", json={"instances": data.x_test[:3].tolist()}).status_code == 200
        assert client.post("/predict", json={"instances": [[1.0]]}).status_code == 422
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = samples(client)
    assert got[("workbench_http_requests_total", (("model_version", "1"), ("route", "/predict"), ("status", "2xx")))] == 1
    assert got[("workbench_http_requests_total", (("model_version", ""), ("route", "/predict"), ("status", "4xx")))] == 1
    assert got[("workbench_rows_per_request_count", (("route", "/predict"),))] == 1
    assert got[("workbench_rows_per_request_sum", (("route", "/predict"),))] == 3
    assert got[("workbench_http_request_duration_seconds_count", (("route", "/predict"),))] == 2
    assert got[("workbench_model_info", (("name", "t"), ("role", "champion"), ("version", "1")))] == 1
    assert got[("workbench_model_info", (("name", "t"), ("role", "challenger"), ("version", "2")))] == 1


def test_request_series_fold_in_batches_and_at_each_scrape():
    """Requests wait in a list, folded every FOLD_EVERY and whenever /metrics is scraped: the
    scrape sees every request, and the list never holds more than FOLD_EVERY."""
    series = Metrics()
    n = 2 * RequestSeries.FOLD_EVERY + 7
    for i in range(n):
        series.observe("/predict", 200, "1", 0.0004 if i % 2 else 0.003, 2)
    series.observe("/predict", 422, "", 0.0001, None)
    assert series._fast is not None and len(series._fast.pending) == 8
    got = parse_samples(series.exposition().decode())
    assert not series._fast.pending
    assert got[("workbench_http_requests_total", (("model_version", "1"), ("route", "/predict"), ("status", "2xx")))] == n
    assert got[("workbench_http_requests_total", (("model_version", ""), ("route", "/predict"), ("status", "4xx")))] == 1
    assert got[("workbench_http_request_duration_seconds_count", (("route", "/predict"),))] == n + 1
    assert got[("workbench_http_request_duration_seconds_bucket", (("le", "0.0005"), ("route", "/predict")))] == n // 2 + 1
    assert got[("workbench_rows_per_request_count", (("route", "/predict"),))] == n
    assert got[("workbench_rows_per_request_sum", (("route", "/predict"),))] == 2 * n


def test_metrics_of_several_workers_add_up_in_files(tmp_path):
    """SERVING_WORKERS > 1: each worker process writes prometheus_client's files (the mode is
    chosen when prometheus_client is imported, so each worker here is a fresh process); a scrape
    in any of them adds them all up."""
    worker = ("import sys; from serving.metrics import Metrics; m = Metrics()\n"
              "for _ in range(3): m.observe('/predict', 200, '1', 0.002, 4)\n"
              "m.observe('/health', 200, '', 0.0001, None)\n"
              "sys.stdout.write(m.exposition().decode())")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", worker], env=env, check=True, capture_output=True)
    text = subprocess.run([sys.executable, "-c", worker], env=env, check=True, capture_output=True, text=True).stdout
    got = parse_samples(text)
    assert got[("workbench_http_requests_total", (("model_version", "1"), ("route", "/predict"), ("status", "2xx")))] == 6
    assert got[("workbench_rows_per_request_sum", (("route", "/predict"),))] == 24
    assert ("workbench_rows_per_request_count", (("route", "/health"),)) not in got


def test_metrics_can_be_turned_off(two_versions):
    data, _ = two_versions
    with app_client(two_versions, serving_metrics=False) as client:
        assert client.get("/metrics").status_code == 404
        assert client.post("/predict", json={"instances": data.x_test[:1].tolist()}).status_code == 200


def test_request_id_is_echoed_or_made_and_in_the_access_log(two_versions, capsys):
    data, _ = two_versions
    for log_format in ("text", "json"):
        with app_client(two_versions, serving_log_format=log_format) as client:
            r = client.post("/predict", json={"instances": data.x_test[:1].tolist()}, headers={"x-request-id": "req-42"})
            assert r.headers["x-request-id"] == "req-42" and r.headers["x-model-version"] == "1"
            made = client.get("/health").headers["x-request-id"]
            assert len(made) == 32 and made != "req-42"
            assert client.get("/health", headers={"x-request-id": "x" * 500}).headers["x-request-id"] != "x" * 500
        lines = [line for line in capsys.readouterr().err.splitlines() if "serving.access" in line]
        if log_format == "text":
            assert '"POST /predict" 200 ' in lines[0] and lines[0].endswith("version=1 request_id=req-42")
            assert lines[1].endswith(f"request_id={made}")
        else:  # SERVING_LOG_FORMAT=json: one object per line
            first = json.loads(lines[0])
            assert (first["request_id"], first["status"], first["model_version"], first["path"]) == ("req-42", 200, "1", "/predict")
            assert json.loads(lines[1])["request_id"] == made


def test_access_lines_are_written_together_within_the_flush_interval(two_versions, capsys):
    data, _ = two_versions
    body = {"instances": data.x_test[:1].tolist()}
    with app_client(two_versions, serving_access_log_flush_seconds=0.3) as client:
        for _ in range(3):
            assert client.post("/predict", json=body).status_code == 200
        deadline = time.monotonic() + 5
        lines: list[str] = []
        while len(lines) < 3 and time.monotonic() < deadline:  # the server is still up: the timer wrote them
            time.sleep(0.1)
            lines += [line for line in capsys.readouterr().err.splitlines() if "serving.access" in line]
        assert len(lines) == 3
    with app_client(two_versions, serving_access_log_flush_seconds=0) as client:  # 0: each line at once
        client.post("/predict", json=body)
        assert "serving.access" in capsys.readouterr().err


def test_a_batch_of_access_lines_is_written_in_whole_lines_of_at_most_pipe_buf_bytes(monkeypatch):
    """Several workers share one stderr pipe: each write must be atomic (<= PIPE_BUF) and whole lines."""
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stderr", Recorder())
    log = AccessLog("json", flush_seconds=60)
    for i in range(AccessLog.MAX_LINES - 1):  # no event loop: each line is written at once
        log.write("127.0.0.1", "POST", f"/predict/é{i}", 200, 0.001, "1", "r" * 32)
    assert len(writes) == AccessLog.MAX_LINES - 1
    writes.clear()
    log._lines = [f'{{"n": {i}, "path": "{"é" * 100}"}}\n' for i in range(AccessLog.MAX_LINES)]
    log.flush()
    assert 1 < len(writes) < AccessLog.MAX_LINES
    assert all(len(w.encode()) <= 4096 and w.endswith("\n") for w in writes)
    assert [json.loads(line)["n"] for w in writes for line in w.splitlines()] == list(range(AccessLog.MAX_LINES))


def test_an_unexpected_error_on_a_prediction_route_is_a_500_counted_and_logged(two_versions, capsys, monkeypatch):
    data, (v1, _) = two_versions

    def broken(x):
        raise RuntimeError("boom")

    monkeypatch.setattr(v1, "forward", broken)
    with app_client(two_versions, serving_access_log_flush_seconds=0) as client:
        quiet = TestClient(client.app, raise_server_exceptions=False)  # as a server answers: a 500
        assert quiet.post("/predict", json={"instances": data.x_test[:1].tolist()}).status_code == 500
        got = samples(client)
    assert got[("workbench_http_requests_total", (("model_version", "1"), ("route", "/predict"), ("status", "5xx")))] == 1
    assert '"POST /predict" 500 ' in capsys.readouterr().err


def test_the_admin_token_guards_reload_not_predictions(two_versions):
    data, _ = two_versions
    with app_client(two_versions, serving_admin_token="s3cret") as client:
        r = client.post("/reload")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.post("/reload", headers={"authorization": "Bearer nope"}).status_code == 403
        assert client.post("/reload", headers={"authorization": "Basic s3cret"}).status_code == 401
        # The right token passes the guard (this fixed set has nothing to reload: 409).
        assert client.post("/reload", headers={"authorization": "Bearer s3cret"}).status_code == 409
        assert client.post("/predict", json={"instances": data.x_test[:1].tolist()}).status_code == 200
        assert client.get("/metrics").status_code == 200


def test_v2_routes_answer_like_predict_for_each_version(two_versions):
    data, (v1, v2) = two_versions
    rows = data.x_test[:4]
    with app_client(two_versions, challenger=False) as client:
        assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/v2/models/t/ready").json() == {"name": "t", "ready": True}
        meta = client.get("/v2/models/t").json()
        assert meta["versions"] == ["1", "2"] and meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
        predict = client.post("/predict", json={"instances": rows.tolist()}).json()
        matrix = {"id": "a1", "inputs": [{"name": "input", "shape": [4, 30], "datatype": "FP32", "data": rows.tolist()}]}
        r = client.post("/v2/models/t/infer", json=matrix)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_name"] == "t" and body["model_version"] == "1" and body["id"] == "a1"
        out = {o["name"]: o for o in body["outputs"]}
        np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (4, 2)), predict["probabilities"], atol=1e-6)
        assert out["label"]["data"] == predict["predictions"] and out["label"]["datatype"] == "BYTES"
        named = {"inputs": [{"name": n, "shape": [4], "datatype": "FP64", "data": rows[:, j].tolist()}
                            for j, n in enumerate(data.spec.feature_names)], "outputs": [{"name": "label"}]}
        body = client.post("/v2/models/t/infer", json=named).json()
        assert [o["name"] for o in body["outputs"]] == ["label"] and body["outputs"][0]["data"] == predict["predictions"]
        # A pinned version answers on its own route, with its own answer.
        body = client.post("/v2/models/t/versions/2/infer", json=matrix).json()
        expected = v2.predict(rows.astype(np.float32))["probabilities"]
        assert body["model_version"] == "2"
        np.testing.assert_allclose(np.reshape(body["outputs"][0]["data"], (4, 2)), expected, atol=1e-6)
        assert client.get("/v2/models/t/versions/2/ready").status_code == 200
        assert client.get("/v2/models/t/versions/9").status_code == 404
        assert client.post("/v2/models/other/infer", json=matrix).status_code == 404
        loaded = client.get("/model").json()["loaded"]
        assert [(v["version"], v["role"]) for v in loaded] == [("1", "champion"), ("2", "pinned 2")]


def test_v2_binary_tensor_data_both_ways(two_versions):
    data, (v1, _) = two_versions
    rows = data.x_test[:3].astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [3, 30], "datatype": "FP32",
                                     "parameters": {"binary_data_size": rows.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    with app_client(two_versions) as client:
        r = client.post("/v2/models/t/infer", content=header + rows.tobytes(),
                        headers={"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    probs = np.frombuffer(r.content[n:n + sizes[0]], dtype="<f4").reshape(3, 2)
    np.testing.assert_allclose(probs, v1.predict(rows)["probabilities"], atol=1e-6)
    raw, labels, pos = r.content[n + sizes[0]:], [], 0
    while pos < len(raw):
        (k,) = struct.unpack_from("<I", raw, pos)
        labels.append(raw[pos + 4:pos + 4 + k].decode())
        pos += 4 + k
    assert labels == v1.predict(rows)["predictions"]


def _infer(inputs, **extra):
    return {"inputs": inputs, **extra}


ROW = [0.5] * 30


@pytest.mark.parametrize(("body", "headers", "status", "message"), [
    (b"{not json", {}, 400, "the request is not JSON"),
    (_infer([]), {}, 400, "inputs: must be a non-empty list"),
    ({"inputs": "x"}, {}, 400, "inputs: must be a non-empty list"),
    (_infer(["x"]), {}, 400, "inputs.0: must be an object"),
    (_infer([{"name": "input", "shape": [1, 30], "datatype": "FP32"}]), {}, 400, "inputs.0 (input).data: missing"),
    (_infer([{"name": "input", "shape": [1, -30], "datatype": "FP32", "data": ROW}]), {}, 400, "non-negative integers"),
    (_infer([{"name": "input", "shape": [2, 30], "datatype": "FP32", "data": ROW}]), {}, 400, "holds 60 values, data has 30"),
    (_infer([{"name": "input", "shape": [1, 30], "datatype": "FP99", "data": ROW}]), {}, 400, "datatype: must be one of"),
    (_infer([{"name": "input", "shape": [1, 29], "datatype": "FP32", "data": ROW[:29]}]), {}, 400, "shape [N, 30] expected"),
    (_infer([{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": ["a"] * 30}]), {}, 400, "holds numbers, got 'a'"),
    (_infer([{"name": "input", "shape": [1, 30], "datatype": "BYTES", "data": ["a"] * 30}]), {}, 400, "takes numbers (FP32)"),
    (_infer([{"name": "colour", "shape": [1], "datatype": "FP32", "data": [1.0]}]), {}, 400, "missing mean radius"),
    (_infer([{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": ROW}], outputs=[{"name": "x"}]), {}, 400,
     "outputs.0.name: must be one of probabilities, label"),
    (_infer([{"name": "input", "shape": [0, 30], "datatype": "FP32", "data": []}]), {}, 400, "at least one row"),
    (_infer([{"name": "input", "shape": [51, 30], "datatype": "FP32", "data": ROW * 51}]), {}, 413, "the limit is 50"),
    (_infer([{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1e39] * 30}]), {}, 400, "must be a finite number"),
    (_infer([{"name": "input", "shape": [1, 30], "datatype": "FP32", "parameters": {"binary_data_size": 120}}]),
     {"inference-header-content-length": "12x"}, 400, "does not fit"),
    (_infer([{"name": "input", "shape": [1, 30], "datatype": "FP32", "parameters": {"binary_data_size": 999}}]),
     "binary", 400, "past the end of the body"),
])
def test_bad_v2_requests_are_4xx_that_name_the_problem(two_versions, body, headers, status, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if headers == "binary":
        headers = {"inference-header-content-length": str(len(raw))}
        raw += b"\0" * 120
    with app_client(two_versions, serving_max_rows=50) as client:
        r = client.post("/v2/models/t/infer", content=raw, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_shadow_scores_a_sample_after_the_answer_and_tallies_agreement(two_versions):
    data, (v1, v2) = two_versions
    shadow = Shadow(1.0, metrics=None, store=None, log_seconds=60, seed=0)
    rows = data.x_test[:5]
    with app_client(two_versions, shadow=shadow) as client:
        for row in rows:
            assert client.post("/predict", json={"instances": [row.tolist()]}).status_code == 200
        matrix = {"inputs": [{"name": "input", "shape": [2, 30], "datatype": "FP32", "data": rows[:2].tolist()}]}
        assert client.post("/v2/models/t/infer", json=matrix).status_code == 200
        assert client.post("/v2/models/t/versions/2/infer", json=matrix).status_code == 200  # addressed: not shadowed
        client.portal.call(shadow.drain)
        got = samples(client)
    (key, tally), = shadow.pending.items()
    assert key == ("t", "1", "2", "binary")
    ours, theirs = v1.predict_arrays(rows.astype(np.float32))[0], v2.predict_arrays(rows.astype(np.float32))[0]
    agree = int((ours == theirs).sum()) + int((ours[:2] == theirs[:2]).sum())
    assert (tally.requests, tally.rows, tally.agreeing_rows, tally.errors) == (6, 7, agree, 0)
    labels = (("challenger_version", "2"), ("champion_version", "1"))
    assert got[("workbench_shadow_requests_total", (*labels, ("outcome", "scored")))] == 6
    assert got[("workbench_shadow_rows_total", labels)] == 7
    assert got[("workbench_shadow_agreeing_rows_total", labels)] == agree


def test_a_failing_challenger_never_touches_the_answer(two_versions):
    data, (v1, _) = two_versions
    diabetes = load_dataset(name="diabetes", seed=0)  # 10 features: cannot score breast-cancer rows
    keras.utils.set_random_seed(0)
    model = FAMILIES["mlp"].build({"units": [4]}, diabetes.spec)
    path = save_model(model, diabetes.spec, {"optuna.study_name": "d", "optuna.trial_number": "0"})
    broken = from_directory(path, ResolvedModel("models:/t/3", "t", "3", None, "run3"))
    shadow = Shadow(1.0, metrics=None, store=None, log_seconds=60)
    with TestClient(create_app(ServingSettings(), ModelSet.fixed(v1, challenger=broken), shadow=shadow)) as client:
        r = client.post("/predict", json={"instances": data.x_test[:2].tolist()})
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        client.portal.call(shadow.drain)
    (tally,) = shadow.pending.values()
    assert (tally.requests, tally.errors, tally.rows) == (1, 1, 0)


def test_shadow_evidence_in_mlflow_adds_up_over_server_processes(two_versions, tmp_path):
    data, _ = two_versions
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for n in (3, 4):  # two server processes (or two restarts) of the same pair
        shadow = Shadow(1.0, metrics=None, store=store, log_seconds=60, seed=n)
        with app_client(two_versions, shadow=shadow) as client:
            for row in data.x_test[:n]:
                client.post("/predict", json={"instances": [row.tolist()]})
        # Leaving the client ran the app's shutdown: the queue scored, the increments logged.
        assert not shadow.pending
    evidence = read_evidence(store.client, "t", "1", "2")
    assert (evidence.total.requests, evidence.total.rows, evidence.runs, evidence.task) == (7, 7, 1, "binary")
    assert evidence.agreement is not None and 0 <= evidence.agreement <= 1
    assert "7 shadow requests (7 rows, 0 errors)" in evidence.describe()
