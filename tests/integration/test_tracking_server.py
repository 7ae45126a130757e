"""Tracking against the real stack: MLflow server on PostgreSQL, artifacts in the S3 bucket."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from models import load_dataset
from tests.conftest import free_port, tiny_config
from tests.integration.test_postgres_runner import finish, run_cli


def stack_env(mlflow_uri: str) -> dict:
    return {"MLFLOW_TRACKING_URI": mlflow_uri}


def runs_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("workbench.role") == "study"]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: int(r.data.tags["optuna.trial_number"]))
    return parents, children


def test_run_hierarchy_metrics_and_models_on_s3(postgres_url, mlflow_uri, s3_bucket, study_name, write_config, tiny_space):
    cfg = tiny_config(tiny_space, budget={"n_trials": 3}, training={"epochs": 3, "batch_size": 128},
                      tracking={"log_models": "all"})
    code, _, err = finish(run_cli(str(write_config(cfg)), "--storage", postgres_url, "--study-name", study_name,
                                  env=stack_env(mlflow_uri)))
    assert code == 0, err
    client = MlflowClient(mlflow_uri)
    parents, children = runs_of(client, study_name)
    assert len(parents) == 1 and len(children) == 3
    assert parents[0].info.status == "FINISHED"
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    s3, bucket = s3_bucket
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
    data = load_dataset(name="breast_cancer", seed=1)
    mlflow.set_tracking_uri(mlflow_uri)
    for trial, run in zip(study.trials, children, strict=True):
        run_id = run.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        history = client.get_metric_history(run_id, "val_loss")
        assert len(history) == trial.user_attrs["epochs_run"]
        # The model's files are in the bucket itself, not only known to MLflow.
        model_keys = [k for k in keys if run_id in k and "/model/" in k]
        assert any(k.endswith("MLmodel") for k in model_keys) and any(k.endswith("model.keras") for k in model_keys)
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        probs = np.asarray(model.predict(data.x_test), dtype=np.float64).ravel()
        assert float(np.mean((probs > 0.5) == data.y_test)) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
        # The loaded model gives the values the trained one did: its cross-entropy is the logged test_loss.
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        bce = float(-np.mean(data.y_test * np.log(p) + (1 - data.y_test) * np.log(1 - p)))
        assert bce == pytest.approx(run.data.metrics["test_loss"], rel=1e-4)
    assert any(parents[0].info.run_id in k and k.endswith("study_report.html") for k in keys)


def test_two_worker_processes_share_one_parent_run(postgres_url, mlflow_uri, study_name, write_config, tiny_space):
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 4}, tracking={"log_models": "none"},
                                    registry={"auto": False}))
    args = (str(path), "--storage", postgres_url, "--study-name", study_name)
    procs = [run_cli(*args, env=stack_env(mlflow_uri)) for _ in range(2)]
    for code, _, err in [finish(p) for p in procs]:
        assert code == 0, err
    parents, children = runs_of(MlflowClient(mlflow_uri), study_name)
    assert len(parents) == 1
    assert len(children) >= 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in children}


def test_unreachable_artifact_store_stops_before_training(tmp_path, postgres_url, study_name, write_config, tiny_space):
    """A tracking server whose S3 endpoint is down: one message, exit 1, no trial trained."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
         "--artifacts-destination", "s3://mlflow/", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--allowed-hosts", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        # MLflow's own HTTP retries off: the runner's bounded retries (1+2+4+8 s) still run and fail.
        env = {**stack_env(uri), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        code, _, err = finish(run_cli(str(write_config(tiny_config(tiny_space))), "--storage", postgres_url,
                                      "--study-name", study_name, env=env), timeout=300)
        assert code == 1, err
        assert "uploading the config to the artifact store failed" in err and "Traceback" not in err
        assert optuna.load_study(study_name=study_name, storage=postgres_url).trials == []
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
