"""engine: keras_tuner: the YAML space compiled for KerasTuner, what it refuses, and its trials
recorded in the Optuna storage and MLflow exactly like the Optuna engine's."""

from __future__ import annotations

import random

import mlflow
import optuna
import pytest
import yaml

from search_spaces import (
    compile_space,
    keras_tuner_problems,
    load_space,
    params_from_values,
    parse_space,
    to_hyperparameters,
)
from studies.config import load_config
from studies.run import main as run_main
from studies.tracking import flatten_params
from tests.conftest import ROOT, tiny_config


def _conditions(hp):
    return {h.name: [(c.name, list(c.values)) for c in h.conditions] for h in hp.space}


def test_conditions_chain_through_their_ancestors_and_layers_follow_the_count():
    hp = to_hyperparameters(load_space(ROOT / "search_spaces" / "mlp.yaml"))
    cond = _conditions(hp)
    assert cond["units_0"] == [("n_layers", [1, 2, 3])]
    assert cond["units_2"] == [("n_layers", [3])]
    assert cond["use_momentum"] == [("optimizer", ["sgd"])]
    # KerasTuner tests a parent's value even when the parent is inactive: momentum carries
    # use_momentum's own condition too.
    assert cond["momentum"] == [("optimizer", ["sgd"]), ("use_momentum", [True])]
    assert cond["learning_rate"] == []
    kinds = {h.name: type(h).__name__ for h in hp.space}
    assert kinds["units_1"] == "Int" and hp._hps["units_1"][0].sampling == "log"
    assert kinds["dropout_0"] == "Float" and hp._hps["dropout_0"][0].step == 0.05
    assert kinds["activation"] == "Choice"
    # Every flat name Optuna knows, and no other.
    assert set(cond) == set(compile_space(load_space(ROOT / "search_spaces" / "mlp.yaml")))


def test_conditions_on_fixed_parameters_are_decided_once():
    space = parse_space({"params": {
        "depth": {"type": "fixed", "value": 2},
        "width": {"type": "int", "low": 4, "high": 8, "per_layer": "depth"},
        "mode": {"type": "fixed", "value": "a"},
        "on_a": {"type": "float", "low": 0.0, "high": 1.0, "when": {"mode": "a"}},
    }}, "inline.yaml")
    cond = _conditions(to_hyperparameters(space))
    assert cond == {"width_0": [], "width_1": [], "on_a": []}


@pytest.mark.parametrize("path", ["mlp.yaml", "cnn.yaml"])
def test_values_kerastuner_draws_are_valid_optuna_params(path):
    import keras_tuner

    space = load_space(ROOT / "search_spaces" / path)
    dists = compile_space(space)
    oracle = keras_tuner.oracles.RandomSearchOracle(objective="val_loss", max_trials=50,
                                                    hyperparameters=to_hyperparameters(space), seed=3)
    random.seed(0)
    seen_conditional = False
    for _ in range(50):
        params = params_from_values(space, oracle._random_values())
        for name, value in flatten_params(params).items():
            if name not in dists:  # a fixed parameter
                assert space.params[name].value == value
                continue
            dist = dists[name]
            assert dist._contains(dist.to_internal_repr(value)), (name, value)
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                assert any(type(value) is type(c) and value == c for c in dist.choices), (name, value)
        if "n_layers" in params:
            assert len(params["units"]) == params["n_layers"]
        seen_conditional |= "momentum" in params
    assert path == "cnn.yaml" or seen_conditional


def test_values_are_put_back_on_the_grid_and_bools_stay_bools():
    space = parse_space({"params": {
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        "bn": {"type": "categorical", "choices": [False, True]},
        "k": {"type": "int", "low": 1, "high": 9, "step": 2},
    }}, "inline.yaml")
    import numpy as np

    params = params_from_values(space, {"dropout": 0.30000000000000004, "bn": 1, "k": np.int64(5)})
    assert params == {"dropout": 0.3, "bn": True, "k": 5}
    assert type(params["bn"]) is bool and type(params["k"]) is int
    with pytest.raises(KeyError, match="not one of its choices"):
        params_from_values(space, {"dropout": 0.1, "bn": "yes", "k": 1})


def test_a_value_keras_tuner_proposes_past_the_range_is_kept_within_it():
    """KerasTuner's Bayesian oracle maps its optimizer's upper bound (1.0) to high + 1 for an int
    without a step: the run failed on `units_0 = 257` for a range of 16-256 (log)."""
    import keras_tuner

    space = parse_space({"params": {"units": {"type": "int", "low": 16, "high": 256, "log": True},
                                    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}}, "inline.yaml")
    proposed = keras_tuner.engine.hyperparameters.Int("units", 16, 256, sampling="log").prob_to_value(1.0)
    assert proposed == 257  # KerasTuner's own mapping, which the oracle reaches
    assert params_from_values(space, {"units": proposed, "lr": 0.1000000001}) == {"units": 256, "lr": 0.1}


def test_what_kerastuner_cannot_express_is_refused(write_config, tmp_path, capsys):
    space = tmp_path / "mixed.yaml"
    space.write_text("params:\n  units: {type: int, low: 4, high: 8}\n"
                     "  learning_rate: {type: categorical, choices: [0.01, 1]}\n")
    assert keras_tuner_problems(load_space(space)) == [(
        "params.learning_rate.choices",
        "KerasTuner's Choice holds values of one type, got float and int ([0.01, 1]); write them all as one type, "
        "or use engine: optuna")]
    cfg = write_config(tiny_config(space, engine="keras_tuner", sampler=None, pruner=None))
    data = yaml.safe_load(cfg.read_text())
    del data["sampler"], data["pruner"]
    cfg.write_text(yaml.safe_dump(data))
    assert run_main([str(cfg), "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert f"{space}: params.learning_rate.choices: KerasTuner's Choice holds values of one type" in err
    assert "Traceback" not in err
    # The Optuna engine takes the same space.
    data["engine"] = "optuna"
    cfg.write_text(yaml.safe_dump(data))
    load_config(cfg)


def _kt_config(space, **sections) -> dict:
    data = tiny_config(space, engine="keras_tuner", **sections)
    for key in ("sampler", "pruner"):
        if key not in sections:
            del data[key]
    return data


@pytest.mark.parametrize(("sections", "path", "message"), [
    ({"keras_tuner": {"tuner": "hyperband", "options": {"max_epochs": 5}}}, "keras_tuner.options.max_epochs",
     "not an option of the hyperband tuner (options: factor, hyperband_iterations;"),
    ({"keras_tuner": {"tuner": "bayesian", "options": {"alpha": -1}}}, "keras_tuner.options.alpha",
     "Input should be greater than 0, got -1"),
    ({"keras_tuner": {"tuner": "grid"}}, "keras_tuner.tuner", "Input should be 'random', 'bayesian' or 'hyperband'"),
    ({"sampler": {"type": "tpe"}}, "sampler", "Optuna's sampler is not used with engine: keras_tuner"),
    ({"objective": {"metrics": [{"name": "val_loss"}, {"name": "n_params"}]}}, "objective.metrics",
     "KerasTuner optimises one objective"),
])
def test_engine_settings_are_checked(write_config, tiny_space, sections, path, message):
    from models.errors import ConfigError

    cfg = write_config(_kt_config(tiny_space, **sections))
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert [p for p, _ in e.value.problems] == [path]
    assert message in e.value.problems[0][1]


def test_keras_tuner_section_needs_the_engine(write_config, tiny_space):
    from models.errors import ConfigError

    cfg = write_config(tiny_config(tiny_space, keras_tuner={"tuner": "random"}))
    with pytest.raises(ConfigError, match="keras_tuner: only used with engine: keras_tuner"):
        load_config(cfg)


def test_workers_are_refused_for_keras_tuner(write_config, tiny_space, capsys):
    cfg = write_config(_kt_config(tiny_space))
    assert run_main([str(cfg), "--workers", "2", "--no-tracking"]) == 2
    assert "engine: KerasTuner runs its search in one process" in capsys.readouterr().err


def test_hyperband_trials_land_in_optuna_and_mlflow_like_optuna_trials(home, write_config, tiny_space, capsys):
    """One KerasTuner Hyperband study and one Optuna study on the same space: the same storage
    records, the same run tags and metrics; the tuner's folder is inside the project data folder."""
    kt_cfg = write_config(_kt_config(tiny_space, study={"name": "kt", "seed": 1}, budget={"n_trials": 5},
                                     training={"epochs": 4, "batch_size": 128, "early_stopping_patience": None},
                                     keras_tuner={"tuner": "hyperband", "options": {"factor": 2}}), "kt.yaml")
    opt_cfg = write_config(tiny_config(tiny_space, study={"name": "opt", "seed": 1}, budget={"n_trials": 2},
                                       training={"epochs": 4, "batch_size": 128, "early_stopping_patience": None},
                                       tracking={"experiment": "kt"}), "opt.yaml")
    assert run_main([str(kt_cfg)]) == 0
    assert run_main([str(opt_cfg)]) == 0
    out = capsys.readouterr().out
    assert "registered as kt v1" in out

    storage = f"sqlite:///{home / 'optuna.db'}"
    study = optuna.load_study(study_name="kt", storage=storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    assert study.user_attrs["workbench:engine"] == "keras_tuner.hyperband"
    dists = compile_space(load_space(tiny_space))
    for t in trials:
        assert set(t.distributions) <= set(dists) and all(t.distributions[k] == dists[k] for k in t.distributions)
        first, epochs = t.user_attrs["kt_initial_epoch"], t.user_attrs["kt_epochs"]
        # Intermediate values at the epochs the trial trained, the value is the restored best epoch's.
        assert sorted(t.intermediate_values) == list(range(first, epochs))
        assert t.value == pytest.approx(t.user_attrs["val_loss"])
        assert t.value == pytest.approx(min(t.intermediate_values.values()), rel=1e-4)
    continued = [t for t in trials if "kt_continues" in t.user_attrs]
    assert continued, "Hyperband with factor 2 over 4 epochs promotes at least one trial"
    assert all(t.user_attrs["kt_initial_epoch"] > 0 for t in continued)
    project = home.resolve() / "keras_tuner"
    assert study.user_attrs["keras_tuner_project"].startswith(str(project))
    assert list(project.glob("kt-*/oracle.json"))

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kt")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = {r.data.tags[optuna_tag]: r for r in runs if r.data.tags.get("workbench.role") == "study"
               for optuna_tag in ["optuna.study_name"]}
    assert set(parents) == {"kt", "opt"}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    kt_runs = [r for r in children if r.data.tags["mlflow.parentRunId"] == parents["kt"].info.run_id]
    opt_runs = [r for r in children if r.data.tags["mlflow.parentRunId"] == parents["opt"].info.run_id]
    assert len(kt_runs) == 5 and len(opt_runs) == 2
    kt_tags = set(kt_runs[0].data.tags) - {k for k in kt_runs[0].data.tags if k.startswith("workbench.kt_")}
    assert kt_tags - {"workbench.engine"} >= set(opt_runs[0].data.tags) - {"workbench.engine", "workbench.model",
                                                                           "mlflow.log-model.history"}
    assert set(kt_runs[0].data.metrics) == set(opt_runs[0].data.metrics)
    assert {r.data.tags["workbench.engine"] for r in kt_runs} == {"keras_tuner"}
    assert parents["kt"].data.tags["workbench.sampler"] == "keras_tuner.hyperband"
    one = kt_runs[0]
    trial = trials[int(one.data.tags["optuna.trial_number"])]
    history = client.get_metric_history(one.info.run_id, "val_loss")
    assert {m.step: m.value for m in history} == pytest.approx(trial.intermediate_values)
    assert one.data.tags["optuna.state"] == "COMPLETE" and one.info.status == "FINISHED"
    assert one.data.params == {**{k: str(v) for k, v in trial.params.items()}, "batch_size": "128"}  # + the fixed one

    # Same command, bigger budget: KerasTuner resumes its own project, the study grows to 7.
    assert run_main([str(kt_cfg), "--n-trials", "7"]) == 0
    assert len(optuna.load_study(study_name="kt", storage=storage).trials) == 7


@pytest.mark.parametrize("tuner", ["random", "bayesian"])
def test_random_and_bayesian_tuners(home, write_config, tiny_space, tuner):
    cfg = write_config(_kt_config(tiny_space, budget={"n_trials": 3},
                                  keras_tuner={"tuner": tuner, **({"options": {"num_initial_points": 2}} if tuner == "bayesian" else {})}))
    assert run_main([str(cfg), "--no-tracking"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert all(sorted(t.intermediate_values) == [0, 1] for t in study.trials)  # all epochs, no pruning
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3


def test_failed_trials_are_recorded_and_stop_at_max_failed(home, write_config, tmp_path):
    space = tmp_path / "diverge.yaml"
    space.write_text("params: {units: {type: fixed, value: 64}, optimizer: {type: fixed, value: sgd},"
                     " learning_rate: {type: float, low: 1.0e+11, high: 1.0e+12, log: true}}\n")
    cfg = write_config(_kt_config(space, budget={"n_trials": 5, "max_failed": 2}, keras_tuner={"tuner": "random"}))
    assert run_main([str(cfg), "--no-tracking"]) == 1
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all("loss became" in t.user_attrs["fail_reason"] for t in trials)


def test_one_study_holds_one_engine(home, write_config, tiny_space, capsys):
    cfg = write_config(tiny_config(tiny_space, budget={"n_trials": 1}))
    assert run_main([str(cfg), "--no-tracking"]) == 0
    kt = write_config(_kt_config(tiny_space, budget={"n_trials": 2}), "kt.yaml")
    assert run_main([str(kt), "--no-tracking"]) == 2
    assert ("engine: study 'tiny' was run with optuna, this config asks keras_tuner.hyperband"
            in capsys.readouterr().err)


def test_sigterm_fails_the_running_trial_and_the_same_command_resumes(home, write_config, tiny_space):
    """SIGTERM in the middle of a KerasTuner trial: exit 143, that trial FAIL with its reason,
    the parent run KILLED; the same command resumes KerasTuner's project and completes the budget."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    # 120 epochs: a trial still trains when the signal comes (30-epoch trials on the shared train
    # step sometimes ended first on a busy machine).
    cfg = write_config(_kt_config(tiny_space, budget={"n_trials": 2}, keras_tuner={"tuner": "random"},
                                  training={"epochs": 120, "batch_size": 16, "early_stopping_patience": None}))
    # CURVE_SECONDS=0: each epoch's value in the database at once, so the signal comes early in the
    # trial (by default the first ones land a second after the trial's last write).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CURVE_SECONDS": "0"}
    storage = f"sqlite:///{home / 'optuna.db'}"

    def training() -> bool:
        """Whether a RUNNING trial has reported an epoch, read-only (opening an Optuna storage here
        would race the runner's schema creation)."""
        import sqlite3

        query = ("SELECT count(*) FROM trials t JOIN trial_intermediate_values v ON v.trial_id = t.trial_id "
                 "WHERE t.state = 'RUNNING'")
        try:
            with contextlib.closing(sqlite3.connect(f"file:{home / 'optuna.db'}?mode=ro", uri=True)) as db:
                return db.execute(query).fetchone()[0] > 0
        except sqlite3.Error:  # not created yet, or locked for a moment
            return False

    proc = subprocess.Popen([sys.executable, "-m", "studies.run", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not training():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert "RUNNING" not in [t.state.name for t in trials]
    interrupted = [t for t in trials if t.user_attrs.get("fail_reason") == "interrupted (SIGTERM)"]
    assert len(interrupted) == 1 and interrupted[0].state.name == "FAIL"
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert {r.info.status for r in runs if r.data.tags.get("workbench.role") == "study"} == {"KILLED"}
    assert "RUNNING" not in {r.info.status for r in runs}
    done = subprocess.run([sys.executable, "-m", "studies.run", str(cfg)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state.name for t in after].count("COMPLETE") == 2
    assert "RUNNING" not in [t.state.name for t in after]
