"""MLflow tracking on the embedded default (SQLite + local artifacts in the project data folder)."""

from __future__ import annotations

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from models import load_dataset
from studies.run import main as run_main
from studies.tracking import flatten_params
from tests.conftest import tiny_config


def main(argv):
    """The runner with tracking, without registering the winner (the registry has its own tests)."""
    return run_main([*argv, "--no-register"])


def client_for(home) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def runs_of(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("workbench.role") == "study"]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: int(r.data.tags["optuna.trial_number"]))
    return parents, children


def test_study_logs_one_parent_and_a_child_per_trial(home, write_config, tiny_space, monkeypatch):
    from studies.engines import runner
    from studies.tracking import Tracker

    order = []
    summary, end_study = runner.summary, Tracker.end_study
    monkeypatch.setattr(runner, "summary", lambda *a, **k: order.append("summary") or summary(*a, **k))
    monkeypatch.setattr(Tracker, "end_study", lambda *a, **k: order.append("end_study") or end_study(*a, **k))
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 3}, training={"epochs": 3, "batch_size": 128}))
    assert main([str(path)]) == 0
    assert order == ["summary", "end_study"]  # the report and the parent run's end are off the user's path
    client = client_for(home)
    parents, children = runs_of(client, "tiny")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"inputs", "reports", "summary.json"}
    report = client.list_artifacts(parent.info.run_id, "reports")[0]
    assert report.path == "reports/study_report.html" and report.file_size > 100_000  # plotly.js embedded
    assert parent.data.metrics["n_complete"] == 3
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    for trial, run in zip(study.trials, children, strict=True):
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == f"trial-{trial.number}" and run.info.status == "FINISHED"
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id  # two-way link
        assert tags["optuna.state"] == "COMPLETE" and tags["optuna.study_name"] == "tiny"
        for key in ("workbench.space_hash", "workbench.config_hash", "workbench.data_hash", "workbench.seed",
                    "workbench.sampler", "workbench.pruner"):
            assert tags[key]
        assert run.data.params == {k: str(v) for k, v in flatten_params({**trial.params, "batch_size": 128}).items()}
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(trial.user_attrs["epochs_run"]))
        assert run.data.metrics["test_loss"] == pytest.approx(trial.user_attrs["test_loss"])
        assert run.data.metrics["best_val_loss"] == pytest.approx(trial.value)


def test_best_models_are_logged_and_load_with_pyfunc(home, write_config, tiny_space):
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 3}))
    assert main([str(path)]) == 0
    client = client_for(home)
    _, children = runs_of(client, "tiny")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    with_model = [r for r in children if r.data.tags.get("workbench.model") == "model"]
    assert children[0] in with_model  # the first COMPLETE trial is always the best so far
    best_run = next(r for r in children if r.info.run_id == study.best_trial.user_attrs["mlflow_run_id"])
    assert best_run.data.tags.get("workbench.model") == "model"  # the winner always has its model
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{best_run.info.run_id}/model")
    meta = model.metadata.metadata
    data = load_dataset(name="breast_cancer", seed=1)
    assert meta["task"] == "binary" and meta["feature_names"] == list(data.spec.feature_names)
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 30)
    # Raw features in: the scaling travels inside the model, and it scores what the run says.
    probs = np.asarray(model.predict(data.x_test)).ravel()
    accuracy = float(np.mean((probs > 0.5) == data.y_test))
    assert accuracy == pytest.approx(best_run.data.metrics["test_accuracy"], abs=1e-6)


def test_pruned_and_failed_trials_have_matching_statuses(home, write_config, tiny_space, tmp_path):
    path = write_config(tiny_config(tiny_space, pruner={"type": "threshold", "options": {"upper": 1e-6}}, budget={"n_trials": 1}))
    assert main([str(path)]) == 0
    space = tmp_path / "diverge.yaml"
    space.write_text("params: {units: {type: fixed, value: 64}, optimizer: {type: fixed, value: sgd},"
                     " learning_rate: {type: float, low: 1.0e+11, high: 1.0e+12, log: true}}\n")
    bad = write_config(tiny_config(space, study={"name": "diverge"}, budget={"n_trials": 2, "max_failed": 1}), "bad.yaml")
    assert main([str(bad)]) == 1
    client = client_for(home)
    _, (pruned,) = runs_of(client, "tiny")
    assert pruned.info.status == "KILLED" and pruned.data.tags["pruned"] == "true"
    assert pruned.data.tags["optuna.state"] == "PRUNED"
    assert len(client.get_metric_history(pruned.info.run_id, "val_loss")) == 1
    _, (failed,) = runs_of(client, "diverge")
    assert failed.info.status == "FAILED" and failed.data.tags["optuna.state"] == "FAIL"
    assert "loss became" in failed.data.tags["optuna.fail_reason"]


def test_resume_reuses_the_parent_run(home, write_config, tiny_space):
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 1}))
    assert main([str(path)]) == 0
    assert main([str(path), "--n-trials", "2"]) == 0
    parents, children = runs_of(client_for(home), "tiny")
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].data.metrics["n_complete"] == 2


def test_unreachable_tracking_server_stops_before_training(home, write_config, tiny_space, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    path = write_config(tiny_config(tiny_space))
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "MLflow tracking server http://127.0.0.1:9 does not answer" in err and "Traceback" not in err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    assert study.trials == []


def test_a_models_requirement_check_reads_only_the_pinned_distributions(monkeypatch, caplog):
    """MLflow's check of a saved model's requirements never scans every installed distribution
    (~5 s of CPU a process), and still finds ours installed at their pinned versions."""
    from mlflow.utils import requirements_utils

    from studies.tracking.model_format import pip_requirements, prime_requirement_checks

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions",
                        lambda: pytest.fail("every distribution was mapped"))
    prime_requirement_checks()
    pinned = [r.partition("==")[0] for r in pip_requirements()]
    assert sorted(p for ps in requirements_utils._MODULES_TO_PACKAGES.values() for p in ps) == sorted(pinned)
    assert {"keras", "numpy", "mlflow"} <= set(pinned) and any(p.startswith("tensorflow") for p in pinned)
    requirements_utils.warn_dependency_requirement_mismatches([*pip_requirements(), "numpy<1"])
    mismatches = [r.getMessage() for r in caplog.records if "mismatches" in r.getMessage()]
    assert len(mismatches) == 1 and "numpy" in mismatches[0] and "keras" not in mismatches[0]
