"""Shared fixtures: small study configs written into tmp_path, pointing at the shipped spaces."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHURN = ROOT / "configs" / "data" / "churn.csv"  # the shipped mixed-type table


def free_port() -> int:
    """A loopback port nothing listens on now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a study config (dict) to a YAML file in tmp_path; returns its path."""

    def write(data: dict, name: str = "study.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def tiny_space(tmp_path: Path) -> Path:
    """A small MLP space that trains in well under a second per epoch."""
    path = tmp_path / "tiny_space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "params": {
                    "n_layers": {"type": "int", "low": 1, "high": 2},
                    "units": {"type": "int", "low": 4, "high": 16, "log": True, "per_layer": "n_layers"},
                    "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
                    "momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"optimizer": "sgd"}},
                    "batch_size": {"type": "fixed", "value": 128},
                }
            }
        )
    )
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty project data folder: the embedded Optuna and MLflow stores live in it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_config(space: Path, **sections) -> dict:
    """A breast-cancer study config with 2 epochs and 3 trials, sections overridable."""
    config = {
        "study": {"name": "tiny", "seed": 1},
        "dataset": {"name": "breast_cancer"},
        "model": {"family": "mlp"},
        "search_space": str(space),
        "objective": {"metric": "val_loss"},
        "budget": {"n_trials": 3},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "training": {"epochs": 2, "batch_size": 128, "early_stopping_patience": None},
    }
    config.update(sections)
    return config


@pytest.fixture(scope="session")
def churn_study(tmp_path_factory):
    """One tiny churn study (2 trials, 2 epochs) on the shipped table, registered as `churn_tiny`:
    (its config, the runner's exit code); the embedded stores are in the config's folder, `home/`."""
    from studies.run import main as run_main

    tmp = tmp_path_factory.mktemp("churn")
    patch = pytest.MonkeyPatch()
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    patch.setenv("WORKBENCH_HOME", str(tmp / "home"))
    space = ROOT / "search_spaces" / "mlp_table.yaml"
    config = tmp / "churn.yaml"
    config.write_text(json.dumps(tiny_config(
        space, study={"name": "churn_tiny", "seed": 5}, budget={"n_trials": 2},
        dataset={"path": str(CHURN), "target": "churn", "columns": {"customer_id": "id"}},
        model={"family": "mlp", "task": "binary"}, objective={"metric": "val_auc", "direction": "maximize"})))
    yield config, run_main([str(config)])
    patch.undo()


def pytest_addoption(parser):
    parser.addoption("--integration-in-one-process", action="store_true",
                     help="with -n: the selected integration tests run one after another in one process, "
                          "handed out first; the other tests one by one to any process")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent with -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s second part (`-n 2 --integration-in-one-process -m "exclusive or not
    integration"`): the integration tests selected there are the exclusive ones, which must run one
    after another (each restarts or stops services the others use). They form one work unit,
    handed out first (the largest), while the other process runs the unit tests one by one.
    xdist's own `--dist loadgroup` does not group with pytest 9 (it renames items through an
    attribute pytest no longer reads), hence a scheduler here."""
    if not config.getoption("integration_in_one_process"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationInOneProcess(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/integration" if nodeid.startswith("tests/integration/") else nodeid

    return IntegrationInOneProcess(config, log)
