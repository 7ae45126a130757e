"""Tracking faults and policies: a logging failure never loses the trial; which models are kept."""

from __future__ import annotations

import optuna
import pytest
from mlflow import MlflowClient

from studies.run import main as run_main
from studies.storage.study import improves
from studies.tracking import client as tracking_client
from studies.tracking import flatten_params
from tests.conftest import tiny_config


def main(argv):
    """The runner with tracking, without registering the winner (the registry has its own tests)."""
    return run_main([*argv, "--no-register"])


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(tracking_client, "RETRY_DELAY", 0.0)


def test_a_failing_log_marks_the_run_failed_and_keeps_the_trial(home, write_config, tiny_space, monkeypatch, capsys):
    original = MlflowClient.log_batch

    def flaky(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if any(t.key == "optuna.state" and t.value == "COMPLETE" for t in tags):
            raise ConnectionError("S3 went away")
        return original(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 1}))
    assert main([str(path)]) == 0
    assert "S3 went away" in capsys.readouterr().err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    (trial,) = study.trials
    assert trial.state.name == "COMPLETE"  # nothing trained is lost
    run = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "S3 went away" in run.data.tags["workbench.tracking_error"]


def test_transient_errors_are_retried(home, write_config, tiny_space, monkeypatch):
    original = MlflowClient.set_terminated
    failures = {"left": 2}

    def flaky(self, run_id, status=None, end_time=None):
        if status == "FINISHED" and failures["left"] and "trial" in self.get_run(run_id).info.run_name:
            failures["left"] -= 1
            raise ConnectionError("tracking server restarting")
        return original(self, run_id, status=status, end_time=end_time)

    monkeypatch.setattr(MlflowClient, "set_terminated", flaky)
    assert main([str(write_config(tiny_config(tiny_space, budget={"n_trials": 1})))]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    run = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert failures["left"] == 0 and run.info.status == "FINISHED"
    # The retry chain is on the run: which step, which attempt, which error.
    assert run.data.tags["workbench.retries"].count("ConnectionError: tracking server restarting") == 2


def test_deterministic_tracking_errors_are_not_retried(home, write_config, tiny_space, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    original = MlflowClient.set_terminated
    calls = {"n": 0}

    def broken(self, run_id, status=None, end_time=None):
        if status == "FINISHED" and "trial" in self.get_run(run_id).info.run_name:
            calls["n"] += 1
            raise MlflowException("bad request", error_code=INVALID_PARAMETER_VALUE)
        return original(self, run_id, status=status, end_time=end_time)

    monkeypatch.setattr(MlflowClient, "set_terminated", broken)
    assert main([str(write_config(tiny_config(tiny_space, budget={"n_trials": 1})))]) == 0
    assert calls["n"] == 1


@pytest.mark.parametrize(
    ("directions", "done", "new", "expected"),
    [
        (["minimize"], [], 1.0, True),
        (["minimize"], [0.5, 0.3], 0.2, True),
        (["minimize"], [0.5, 0.3], 0.3, False),
        (["maximize"], [0.5, 0.3], 0.6, True),
        (["minimize", "minimize"], [(1.0, 10.0)], (2.0, 5.0), True),
        (["minimize", "minimize"], [(1.0, 10.0)], (1.0, 11.0), False),
        (["minimize", "maximize"], [(1.0, 10.0)], (0.5, 5.0), True),
    ],
)
def test_improves_is_best_so_far_or_pareto(directions, done, new, expected):
    study = optuna.create_study(directions=directions)
    for values in done:
        study.add_trial(optuna.trial.create_trial(values=list(values) if isinstance(values, tuple) else [values],
                                                  params={}, distributions={}))
    assert improves(study, new) is expected


def test_flatten_params():
    assert flatten_params({"units": [8, 4], "lr": 0.1}) == {"units_0": 8, "units_1": 4, "lr": 0.1}


def _imported(_: int) -> None:
    import mlflow  # noqa: F401

    import serving.store  # noqa: F401


def _open_mlflow(uri: str, at: float, how: str) -> str:
    import time

    from serving.store import Store

    time.sleep(max(0.0, at - time.time()))  # all start at one moment
    client = tracking_client.mlflow_client(uri) if how == "study" else Store(uri).client  # the API, batch, select
    client.search_experiments()
    return "ok"


def test_processes_opening_a_fresh_mlflow_sqlite_store_at_once_all_open_it(tmp_path):
    """Seen with two runners of one study started together on the embedded default: the second
    found the first's half-made tables ('table _alembic_tmp_model_versions already exists').
    Studies and serving (the API, batch scoring) take turns through the same lock."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_imported, range(4))  # each worker has imported MLflow and both openers before the clock starts
        at = time.time() + 0.5
        uri = f"sqlite:///{tmp_path / 'm.db'}"
        assert pool.starmap(_open_mlflow, [(uri, at, how) for how in ("study", "serving") * 2]) == ["ok"] * 4
