"""`mlflow models serve` on a mixed-type table's registered model answers raw records as our API does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from serving.model import load
from serving.settings import ServingSettings
from serving.store import Store
from tests.conftest import CHURN, free_port


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_gives_the_apis_answers_on_raw_records(churn_study, monkeypatch, tmp_path):
    config, code = churn_study
    assert code == 0
    home = config.parent / "home"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    store = Store.at(ServingSettings())
    ours = load("models:/churn_tiny@champion", store)
    frame = pd.read_csv(CHURN).drop(columns=["churn", "customer_id"]).head(6)
    records = json.loads(frame.to_json(orient="records"))
    records[0]["contract"], records[1]["total_charges"] = "lifetime", None  # unseen level, missing value
    expected = ours.predict(ours.encode_records(records))

    port = free_port()
    venv_bin = Path(sys.executable).parent  # as with the venv activated: mlflow runs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.tracking_uri, "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(venv_bin / "mlflow"), "models", "serve", "-m", "models:/churn_tiny@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read().decode()[-3000:]
                time.sleep(0.5)
        answer = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": records})["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert [row["prediction"] for row in answer] == expected["predictions"]
    probs = [[row["probability_no"], row["probability_yes"]] for row in answer]
    np.testing.assert_allclose(probs, expected["probabilities"], atol=1e-5)
