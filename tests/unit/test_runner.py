"""The runner end to end on SQLite in tmp_path, with a tiny model: resume, pruning, failures."""

from __future__ import annotations

import optuna
import pytest

from studies.run import main as run_main
from studies.storage.study import SPACE_HASH
from tests.conftest import tiny_config


@pytest.fixture
def storage(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    return url


def main(argv):
    """The runner without MLflow (tracking has its own tests)."""
    return run_main([*argv, "--no-tracking"])


def load(url, name="tiny"):
    return optuna.load_study(study_name=name, storage=url)


def test_run_then_resume_to_a_total_budget(write_config, tiny_space, storage, capsys):
    path = write_config(tiny_config(tiny_space))
    assert main([str(path), "--storage", storage, "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "COMPLETE 2  PRUNED 0  FAIL 0" in out and "best       trial" in out
    study = load(storage)
    assert len(study.trials) == 2
    assert study.user_attrs[SPACE_HASH]
    assert study.metric_names == ["val_loss"]
    first = study.trials[0]
    assert {"seed", "n_params", "epochs_run", "val_loss", "test_loss", "test_accuracy"} <= set(first.user_attrs)
    for t in study.trials:  # each epoch reports the best so far, and the last one is the trial's value
        steps = [t.intermediate_values[s] for s in sorted(t.intermediate_values)]
        assert steps == sorted(steps, reverse=True) and steps[-1] == pytest.approx(t.value, rel=1e-9)
    # Same command, bigger budget: only the missing trial runs.
    assert main([str(path), "--storage", storage, "--n-trials", "3"]) == 0
    assert len(load(storage).trials) == 3
    # Budget already met: nothing runs, and that is not an error.
    assert main([str(path), "--storage", storage, "--n-trials", "3"]) == 0
    assert "already has 3 finished trials" in capsys.readouterr().err
    assert len(load(storage).trials) == 3


def test_embedded_default_lives_in_the_project_data_folder(write_config, tiny_space, storage, tmp_path):
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 1}))
    assert main([str(path)]) == 0
    assert (tmp_path / "home" / "optuna.db").is_file()


def test_a_changed_space_is_refused_unless_allowed(write_config, tiny_space, storage, capsys):
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 1}))
    assert main([str(path), "--storage", storage]) == 0
    tiny_space.write_text(tiny_space.read_text().replace("high: 16", "high: 32"))
    assert main([str(path), "--storage", storage, "--n-trials", "2"]) == 2
    assert "was run with another search space" in capsys.readouterr().err
    assert main([str(path), "--storage", storage, "--n-trials", "2", "--allow-space-change"]) == 0
    assert len(load(storage).trials) == 2


def test_a_pruned_trial_measures_serving_costs_only_when_a_constraint_names_one(write_config, tiny_space, storage):
    """The probe (~15 ms a trial) times a completed trial's network; a pruned one is never served,
    unless the sampler must learn from it where latency is feasible."""
    prunes = {"pruner": {"type": "threshold", "options": {"upper": 1e-6}}, "budget": {"n_trials": 1},
              "tracking": {"enabled": False}}
    plain = write_config(tiny_config(tiny_space, study={"name": "plain"}, **prunes), "plain.yaml")
    constrained = write_config(tiny_config(tiny_space, study={"name": "constrained"}, sampler={"type": "tpe"},
                                           constraints={"latency_p50_ms": {"max": 1000}}, **prunes), "constrained.yaml")
    assert main([str(plain), "--storage", storage]) == 0 and main([str(constrained), "--storage", storage]) == 0
    [pruned] = load(storage, "plain").trials
    assert pruned.state.name == "PRUNED" and "latency_p50_ms" not in pruned.user_attrs and pruned.user_attrs["n_params"] > 0
    [pruned] = load(storage, "constrained").trials
    assert pruned.state.name == "PRUNED" and 0 < pruned.user_attrs["latency_p50_ms"] < 1000
    assert pruned.constraints == {"latency_p50_ms_max": pruned.user_attrs["latency_p50_ms"] - 1000}


def test_pruned_and_failed_trials_are_recorded_and_the_study_goes_on(write_config, tiny_space, storage, tmp_path):
    # An upper threshold no epoch can meet prunes every trial after its first epoch.
    path = write_config(tiny_config(tiny_space, pruner={"type": "threshold", "options": {"upper": 1e-6}}))
    assert main([str(path), "--storage", storage, "--n-trials", "2"]) == 0
    states = [t.state.name for t in load(storage).trials]
    assert states == ["PRUNED", "PRUNED"]
    assert all(t.last_step == 0 for t in load(storage).trials)
    # A learning rate that diverges: every trial FAILs with a reason; the run stops at max_failed.
    space = tmp_path / "diverge.yaml"
    space.write_text("params: {units: {type: fixed, value: 64}, optimizer: {type: fixed, value: sgd},"
                     " learning_rate: {type: float, low: 1.0e+11, high: 1.0e+12, log: true}}\n")
    bad = write_config(tiny_config(space, study={"name": "diverge"}, budget={"n_trials": 5, "max_failed": 2}), "bad.yaml")
    assert main([str(bad), "--storage", storage]) == 1
    failed = load(storage, "diverge").trials
    assert [t.state.name for t in failed] == ["FAIL", "FAIL"]
    assert "loss became" in failed[0].user_attrs["fail_reason"]


def test_trials_are_reproducible_from_the_seed(write_config, tiny_space, storage):
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 2}))
    assert main([str(path), "--storage", storage, "--study-name", "a"]) == 0
    assert main([str(path), "--storage", storage, "--study-name", "b"]) == 0
    a, b = load(storage, "a").trials, load(storage, "b").trials
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.value for t in a] == pytest.approx([t.value for t in b], rel=1e-5)
    assert [t.user_attrs["seed"] for t in a] == [t.user_attrs["seed"] for t in b]


def test_multi_objective_study(write_config, tiny_space, storage, capsys):
    cfg = tiny_config(tiny_space, objective={"metrics": [{"name": "val_loss"}, {"name": "n_params"}]},
                      sampler={"type": "nsga2", "options": {"population_size": 4}})
    assert main([str(write_config(cfg)), "--storage", storage, "--n-trials", "2"]) == 0
    study = load(storage)
    assert len(study.directions) == 2 and all(len(t.values) == 2 for t in study.trials)
    assert "pareto" in capsys.readouterr().out


def test_bad_config_exits_2_without_traceback(write_config, tiny_space, storage, capsys):
    path = write_config(tiny_config(tiny_space, training={"epochs": 0}))
    assert main([str(path), "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"{path}: training.epochs: Input should be greater than or equal to 1, got 0"


def test_bad_data_and_bad_storage(write_config, tiny_space, storage, tmp_path, capsys):
    cfg = tiny_config(tiny_space, dataset={"path": "missing.csv", "target": "y"}, model={"family": "mlp", "task": "binary"})
    assert main([str(write_config(cfg)), "--storage", storage]) == 2
    assert "dataset.path: file not found, got" in capsys.readouterr().err
    path = write_config(tiny_config(tiny_space), "ok.yaml")
    assert main([str(path), "--storage", "notaurl"]) == 1
    assert "storage URL is not a valid SQLAlchemy URL" in capsys.readouterr().err


def test_a_trial_replays_alone_with_its_params_and_seed(write_config, tiny_space, storage, capsys):
    from studies.replay import main as replay_main

    path = write_config(tiny_config(tiny_space, budget={"n_trials": 2}))
    assert main([str(path), "--storage", storage]) == 0
    stored = load(storage).trials[1]
    capsys.readouterr()
    assert replay_main([str(path), "--storage", storage, "--trial", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    # Same params + same seed + same split = the same model: every epoch and metric agrees.
    epochs = [line.split() for line in out.splitlines() if line.startswith("  epoch ")]
    assert len(epochs) == len(stored.intermediate_values)
    for _, step, before, after in epochs:
        assert float(after) == pytest.approx(float(before), rel=1e-3), f"epoch {step}"
    assert float(rows["val_loss"][1]) == pytest.approx(stored.user_attrs["val_loss"], rel=1e-3)
    assert float(rows["test_loss"][1]) == pytest.approx(stored.user_attrs["test_loss"], rel=1e-3)
    assert replay_main([str(path), "--storage", storage, "--trial", "7"]) == 1
    assert "has no trial 7 (it has 2)" in capsys.readouterr().err
