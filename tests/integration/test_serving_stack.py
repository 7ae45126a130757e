"""Study -> select -> API subprocess -> predict, reload, shadow, Open Inference Protocol client,
metrics, batch, SIGTERM -> promotion on the shadow evidence: on the real server, PostgreSQL and S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from models import load_dataset
from serving.shadow import read_evidence
from tests.conftest import ROOT, free_port, tiny_config
from tests.integration.test_postgres_runner import finish, run_cli


def _http(url: str, body: dict | None = None, method: str | None = None, token: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if body is not None else "GET"),
                                 headers={"content-type": "application/json",
                                          **({"authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def model_name():
    return f"it_model_{uuid.uuid4().hex[:8]}"


def test_study_select_serve_reload_and_batch(tmp_path, postgres_url, mlflow_uri, s3_bucket, study_name, model_name,
                                             write_config, tiny_space):
    env = {"MLFLOW_TRACKING_URI": mlflow_uri}
    cfg = tiny_config(tiny_space, budget={"n_trials": 2}, registry={"model_name": model_name})
    code, out, err = finish(run_cli(str(write_config(cfg)), "--storage", postgres_url, "--study-name", study_name, env=env))
    assert code == 0, err
    assert f"registered as {model_name} v1" in out

    port = free_port()
    api_env = {**os.environ, **env, "SERVING_MODEL_URI": f"models:/{model_name}@champion", "SERVING_PORT": str(port),
               "TF_CPP_MIN_LOG_LEVEL": "3", "SERVING_ADMIN_TOKEN": "tok", "SERVING_SHADOW_ALIAS": "challenger",
               "SERVING_SHADOW_FRACTION": "1", "SERVING_SHADOW_LOG_SECONDS": "1", "SERVING_LOG_FORMAT": "json"}
    log_path = tmp_path / "api.log"  # a file, not a pipe: a full pipe would block the server's logging
    with log_path.open("w") as log_file:
        api = subprocess.Popen([sys.executable, "-m", "serving"], cwd=ROOT, env=api_env, stdout=log_file,
                               stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if _http(f"{base}/ready")["status"] == "ready":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the API never became ready")
        data = load_dataset(name="breast_cancer", seed=1)
        rows = data.x_test[:20]
        answer = _http(f"{base}/predict", {"instances": rows.tolist()})
        assert answer["model_name"] == model_name and answer["model_version"] == "1"
        mlflow.set_tracking_uri(mlflow_uri)
        reference = np.asarray(mlflow.pyfunc.load_model(f"models:/{model_name}@champion").predict(rows)).ravel()
        np.testing.assert_allclose([p[1] for p in answer["probabilities"]], reference, atol=1e-5)

        # A second, forced selection moves the alias; /reload follows it without a restart.
        cfg2 = tiny_config(tiny_space, budget={"n_trials": 1}, registry={"model_name": model_name}, study={"name": "x", "seed": 5})
        path2 = write_config(cfg2, "second.yaml")
        code, out, err = finish(run_cli(str(path2), "--storage", postgres_url, "--study-name", f"{study_name}_2",
                                        "--no-register", env=env))
        assert code == 0, err
        select = subprocess.run([sys.executable, "-m", "studies.select", str(path2), "--storage", postgres_url,
                                 "--study-name", f"{study_name}_2", "--force"], cwd=ROOT, env={**os.environ, **env},
                                capture_output=True, text=True, timeout=600)
        assert select.returncode == 0, select.stderr
        assert _http(f"{base}/model")["version"] == "1"
        with pytest.raises(urllib.error.HTTPError, match="401"):  # SERVING_ADMIN_TOKEN guards /reload
            _http(f"{base}/reload", {})
        assert _http(f"{base}/reload", {}, token="tok") == {"previous_version": "1", "version": "2", "reloaded": True}
        assert _http(f"{base}/model")["version"] == "2"
        first = answer
        answer = _http(f"{base}/predict", {"instances": rows.tolist()})
        assert answer["model_version"] == "2"

        # v1 becomes @challenger: the server holds both and scores every request with v1 in the shadow.
        MlflowClient(mlflow_uri).set_registered_model_alias(model_name, "challenger", "1")
        assert _http(f"{base}/reload", {}, token="tok")["reloaded"] is True
        assert [(v["version"], v["role"]) for v in _http(f"{base}/model")["loaded"]] == [("2", "champion"), ("1", "challenger")]
        for row in rows:
            assert _http(f"{base}/predict", {"instances": [row.tolist()]})["model_version"] == "2"

        # A real Open Inference Protocol client (binary tensors by default) gets /predict's answers,
        # from the champion and from version 1 by its version route.
        import tritonclient.http as triton

        oip = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert oip.is_server_live() and oip.is_server_ready() and oip.is_model_ready(model_name)
        assert oip.get_model_metadata(model_name)["inputs"][0]["shape"] == [-1, 30]
        tensor = triton.InferInput("input", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows.astype(np.float32))
        result = oip.infer(model_name, [tensor])
        np.testing.assert_allclose(result.as_numpy("probabilities"), answer["probabilities"], atol=1e-6)
        assert [v.decode() for v in result.as_numpy("label")] == answer["predictions"]
        pinned = oip.infer(model_name, [tensor], model_version="1", outputs=[triton.InferRequestedOutput("probabilities",
                                                                                                       binary_data=False)])
        np.testing.assert_allclose(pinned.as_numpy("probabilities"), first["probabilities"], atol=1e-6)
        oip.close()
        # The challenger scores its samples off the request path, after the answers went out: wait for it.
        scored = 'workbench_shadow_requests_total{challenger_version="1",champion_version="2",outcome="scored"} '
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
                scrape = r.read().decode()
            count = sum(float(line[len(scored):]) for line in scrape.splitlines() if line.startswith(scored))
            if count >= len(rows) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        shadow = [line for line in scrape.splitlines() if "shadow" in line and not line.startswith("#")]
        assert count >= len(rows), f"shadow lines {shadow}; the API's log ends: {log_path.read_text()[-3000:]}"
        assert f'workbench_model_info{{name="{model_name}",role="challenger",version="1"}} 1.0' in scrape
        assert 'workbench_http_requests_total{model_version="2",route="/v2/models/{name}/infer",status="2xx"} 1.0' in scrape

        # Batch scoring of a file gives the API's answers, in order; an invalid row is reported, not dropped.
        frame = pd.DataFrame(rows, columns=list(data.spec.feature_names))
        frame.insert(0, "id", [f"r{i}" for i in range(len(frame))])
        frame.loc[7, "mean radius"] = np.nan
        frame.to_csv(tmp_path / "in.csv", index=False)
        batch = subprocess.run([sys.executable, "-m", "serving.batch", "--input", str(tmp_path / "in.csv"), "--output",
                                str(tmp_path / "out.parquet"), "--model", f"models:/{model_name}@champion", "--keep", "id",
                                "--chunk-rows", "6"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                               timeout=600)
        assert batch.returncode == 3, batch.stderr
        scored = pd.read_parquet(tmp_path / "out.parquet")
        assert scored["row"].tolist() == [i for i in range(20) if i != 7]
        assert scored["id"].tolist() == [f"r{i}" for i in range(20) if i != 7]
        expected = np.array([p[1] for i, p in enumerate(answer["probabilities"]) if i != 7])
        np.testing.assert_allclose(scored["probability_malignant"].to_numpy(), expected, atol=1e-5)
        errors = pd.read_csv(tmp_path / "out.parquet.errors.csv")
        assert errors["row"].tolist() == [7] and "mean radius" in errors["reason"][0]
        runs = mlflow.search_runs(experiment_names=["batch-scoring"], filter_string=f"tags.`workbench.model_name` = '{model_name}'")
        assert len(runs) == 1 and runs.iloc[0]["metrics.rows_invalid"] == 1

        # No input, however odd, makes the API answer 5xx (schemathesis explores the OpenAPI schema).
        st = subprocess.run([os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", f"{base}/openapi.json",
                             "--checks", "not_a_server_error", "--max-examples", "60", "--no-color"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)  # its cache stays out of the repo
        assert st.returncode == 0, st.stdout[-4000:]

        # SIGTERM: in-flight requests finish, the shadow's last evidence is logged, exit 0.
        api.send_signal(signal.SIGTERM)
        assert api.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if api.poll() is None:
            os.killpg(api.pid, 9)
            api.wait(timeout=30)
    access = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(a.get("path") == "/predict" and a.get("model_version") == "2" and len(a["request_id"]) == 32 for a in access)
    evidence = read_evidence(MlflowClient(mlflow_uri), model_name, "2", "1")
    assert evidence.total.requests >= len(rows) + 1 and evidence.total.errors == 0, evidence.describe()
    promote = subprocess.run([sys.executable, "-m", "studies.select", str(path2), "--promote-challenger", "--min-agreement",
                              "0", "--min-requests", str(len(rows))], cwd=ROOT, env={**os.environ, **env},
                             capture_output=True, text=True, timeout=600)
    assert promote.returncode == 0, promote.stderr
    assert "@challenger v1 promoted to @champion (was v2)" in promote.stdout
    assert f"shadow evidence: {evidence.total.requests} shadow requests" in promote.stdout
