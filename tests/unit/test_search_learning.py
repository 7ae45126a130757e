"""Search that learns from the past and from serving: warm start across a changed space, the
study-level stop, serving-cost metrics and constraints (issue 18)."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from models.errors import ConfigError
from search_spaces import transfer
from studies.config import load_config
from studies.config.sections import StopSection
from studies.engines.priors import with_priors
from studies.engines.stopping import StopRule, blocked_by_stop, continued_since, record_stop
from studies.storage.study import DATA_HASH, ENGINE, WARM_START_ATTR, stopped_record
from studies.storage.warm_start import warm_start
from tests.conftest import tiny_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- mapping a trial into a changed space -------------------------------------------------
def test_transfer_keeps_clips_and_drops():
    target = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "units": IntDistribution(16, 64, step=16),
              "act": CategoricalDistribution(["relu", "gelu"]), "bn": CategoricalDistribution([False, True])}
    old = {"lr": 0.05, "units": 40, "act": "tanh", "bn": True, "removed": 3}
    clipped = transfer(old, target, clip=True)
    assert clipped.params == {"lr": 1e-2, "units": 48, "bn": True}
    assert sorted(clipped.clipped) == ["lr", "units"] and sorted(clipped.dropped) == ["act", "removed"]
    strict = transfer(old, target, clip=False)
    assert strict.params == {"bn": True} and sorted(strict.dropped) == ["act", "lr", "removed", "units"]
    # a bool is not the number 1, and a number is not a choice
    assert transfer({"bn": 1, "units": True}, target, clip=True).params == {}


# -- the study-level stop ------------------------------------------------------------------
def _study(values: list[float | None], direction: str = "minimize") -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for v in values:
        dist = {"x": FloatDistribution(0, 1)}
        if v is None:
            study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params={"x": 0.5}, distributions=dist))
        else:
            study.add_trial(optuna.trial.create_trial(value=v, params={"x": min(max(v, 0), 1)}, distributions=dist))
    return study


def test_stop_target_and_patience_with_min_delta():
    assert StopRule(StopSection(target=0.2), True).reason(_study([0.5, 0.3])) is None
    assert "target reached: trial 2 has 0.15 <= 0.2" in StopRule(StopSection(target=0.2), True).reason(_study([0.5, 0.3, 0.15]))
    assert "target reached" in StopRule(StopSection(target=0.9), False).reason(_study([0.5, 0.95], "maximize"))
    rule = StopRule(StopSection(patience=3, min_delta=0.01), True)
    # 0.495 improves by less than min_delta: it does not count; a pruned trial counts as finished
    assert rule.reason(_study([0.5, 0.495, None])) is None
    reason = rule.reason(_study([0.5, 0.495, None, 0.6]))
    assert reason is not None and "no improvement of at least 0.01 in 3 finished trials" in reason and "trial 0" in reason
    assert StopRule(StopSection(patience=3), True).reason(_study([0.5, 0.495, None, 0.6])) is None  # 0.495 improved


def test_stop_regret_bound_fires_on_a_converged_study_only():
    import numpy as np

    def study_of(*blocks: tuple[int, float, float, int]) -> optuna.Study:
        """Trials of a 4-d bowl (minimum 0 at 0.5), each block n points uniform in [lo, hi]^4."""
        study = optuna.create_study()
        for n, lo, hi, seed in blocks:
            rng = np.random.default_rng(seed)
            for _ in range(n):
                x = rng.uniform(lo, hi, 4)
                params = {f"x{i}": float(v) for i, v in enumerate(x)}
                study.add_trial(optuna.trial.create_trial(value=float(((x - 0.5) ** 2).sum() * 10), params=params,
                                                          distributions={k: FloatDistribution(0, 1) for k in params}))
        return study

    rule = StopRule(StopSection(regret_bound=0.05, min_trials=8), True)
    assert rule.reason(study_of((6, 0.45, 0.55, 0))) is None  # fewer than min_trials
    assert rule.reason(study_of((20, 0.0, 1.0, 0))) is None  # scattered: a GP sees much left to gain (bound ~1.3)
    reason = rule.reason(study_of((10, 0.0, 1.0, 1), (30, 0.45, 0.55, 0)))  # converged on the minimum (~0.006)
    assert reason is not None and reason.startswith("regret bound 0.0") and "over 40 trials" in reason


def test_a_stopped_study_resumes_only_beyond_its_budget_or_when_told():
    study = _study([0.5, 0.6, 0.7])
    record_stop(study, "no improvement", n_trials=10)
    assert stopped_record(study)["finished"] == 3
    assert "raise --n-trials beyond 10 or pass --ignore-stop" in blocked_by_stop(study, 10, ignore_stop=False)
    assert blocked_by_stop(study, 11, ignore_stop=False) is None
    assert stopped_record(study) is None and continued_since(study) == 3
    # the criteria now judge only the trials after the continuation
    assert StopRule(StopSection(patience=2), True, since=continued_since(study)).reason(study) is None
    record_stop(study, "again", n_trials=11)
    assert blocked_by_stop(study, 11, ignore_stop=True) is None


# -- priors: the sampler learns from trials that are not in the study ----------------------
def test_priors_steer_tpe_from_the_first_trial_and_never_enter_the_study():
    dist = {"x": FloatDistribution(0, 1)}
    priors = []
    for i in range(30):
        x = i / 29
        t = optuna.trial.create_trial(value=(x - 0.8) ** 2, params={"x": x}, distributions=dist)
        t.number = -1 - i
        priors.append(t)

    def first_draws(sampler: optuna.samplers.BaseSampler) -> list[float]:
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda tr: (tr.suggest_float("x", 0, 1) - 0.8) ** 2, n_trials=6)
        assert len(study.trials) == 6 and all(t.number >= 0 for t in study.trials)
        return [t.params["x"] for t in study.trials]

    warm = first_draws(with_priors(optuna.samplers.TPESampler(seed=3, n_startup_trials=10), priors))
    cold = first_draws(optuna.samplers.TPESampler(seed=3, n_startup_trials=10))
    warm_err = sum(abs(x - 0.8) for x in warm) / 6
    cold_err = sum(abs(x - 0.8) for x in cold) / 6
    assert warm_err < 0.12 and warm_err < cold_err / 2, (warm, cold)


# -- warm start from a stored study ---------------------------------------------------------
@pytest.fixture
def source_study(tmp_path, tiny_space, write_config):
    """A finished 'src' study over tiny_space in a SQLite file (no training: trials added)."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    loaded = load_config(write_config(tiny_config(tiny_space, study={"name": "src", "seed": 1, "storage": url}), "src.yaml"))
    from search_spaces import compile_space

    space = compile_space(loaded.space)
    study = optuna.create_study(study_name="src", storage=url)
    study.set_metric_names(["val_loss"])
    study.set_user_attr(ENGINE, "optuna")
    for i, (lr, units) in enumerate([(0.02, 16), (0.001, 4), (0.005, 8), (0.03, 12)]):
        params = {"n_layers": 1, "units_0": units, "learning_rate": lr, "optimizer": "adam"}
        study.add_trial(optuna.trial.create_trial(value=0.1 * (i + 1), params=params,
                                                  distributions={k: space[k] for k in params}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    return url, study


def test_warm_start_maps_a_changed_space_queues_the_best_and_records_lineage(source_study, tmp_path, write_config):
    url, source = source_study
    source.set_user_attr(DATA_HASH, "the source's data")  # its pruner rivals only for a study on the same data
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text("params:\n  n_layers: {type: int, low: 1, high: 2}\n"
                      "  units: {type: int, low: 4, high: 64, log: true, per_layer: n_layers}\n"
                      "  learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
                      "  optimizer: {type: categorical, choices: [sgd, rmsprop]}\n"
                      "  batch_size: {type: fixed, value: 128}\n")
    cfg = tiny_config(narrow, study={"name": "dst", "seed": 1, "storage": url}, warm_start={"from": "src", "top_k": 2})
    loaded = load_config(write_config(cfg, "dst.yaml"))
    study = optuna.create_study(study_name="dst", storage=url)
    started = warm_start(loaded, study, name="src", url=url, own_url=url, queue=True)
    lineage = study.user_attrs[WARM_START_ATTR]
    # 4 finished trials: lr 0.02 and 0.03 are out of the new range (left out of the priors), adam is gone
    assert lineage["source_trials"] == 4 and lineage["priors"] == 4 and lineage["trials_dropped"] == 0
    assert lineage["values_dropped"] == 4 + 2 and lineage["queued"] == 2 and lineage["values_clipped"] == 1
    assert lineage["source_space_hash"] != lineage["space_hash"]
    assert all(p.number < 0 and "optimizer" not in p.params for p in started.priors)
    assert started.data_hash == "the source's data"
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in queued] == [{"n_layers": 1, "units_0": 16, "learning_rate": 0.01},
                                          {"n_layers": 1, "units_0": 4, "learning_rate": 0.001}]
    # a second invocation (resume) queues nothing again
    warm_start(loaded, study, name="src", url=url, own_url=url, queue=True)
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2


@pytest.mark.parametrize("case, message", [
    ("missing", "warm_start.from: no study named 'nope'"),
    ("direction", "warm_start.from: must optimise the same objective as this study (val_accuracy (maximize))"),
    ("engine", "warm_start.from: study 'src' was run by keras_tuner.hyperband"),
    ("itself", "warm_start.from: is this study itself"),
    ("no_file", "warm_start.from: no SQLite storage at"),
])
def test_warm_start_bad_sources(case, message, source_study, tiny_space, write_config, tmp_path):
    url, src = source_study
    name = {"missing": "nope", "itself": "dst"}.get(case, "src")
    source_url = f"sqlite:///{tmp_path / 'absent.db'}" if case == "no_file" else url
    objective = {"metric": "val_accuracy"} if case == "direction" else {"metric": "val_loss"}
    if case == "engine":
        src.set_user_attr(ENGINE, "keras_tuner.hyperband")
    cfg = tiny_config(tiny_space, study={"name": "dst", "storage": url}, objective=objective, warm_start={"from": name})
    loaded = load_config(write_config(cfg, "dst.yaml"))
    study = optuna.create_study(study_name="dst", storage=url, direction=loaded.config.directions[0])
    with pytest.raises(ConfigError) as e:
        warm_start(loaded, study, name=name, url=source_url, own_url=url, queue=True)
    assert message in str(e.value) and "dst.yaml" in str(e.value)


@pytest.mark.parametrize("sections, key, message", [
    ({"budget": {"n_trials": 5, "stop": {}}}, "budget.stop.target", "give at least one of target, patience or regret_bound"),
    ({"budget": {"n_trials": 5, "stop": {"patience": 5}}}, "budget.stop.patience", "must be < budget.n_trials (5)"),
    ({"budget": {"n_trials": 5, "stop": {"regret_bound": 0.01, "min_trials": 8}}}, "budget.stop.min_trials", "could never stop"),
    ({"budget": {"n_trials": 5, "stop": {"min_delta": 0.1, "target": 1}}}, "budget.stop.min_delta", "applies to patience"),
    ({"budget": {"stop": {"target": -0.1}}}, "budget.stop.target", "val_loss lies in [0, inf]: a target outside it can never"),
    ({"objective": {"metric": "val_auc"}, "budget": {"stop": {"target": 1.5}}}, "budget.stop.target", "val_auc lies in [0, 1]"),
    ({"objective": {"metrics": [{"name": "val_loss"}, {"name": "latency_p50_ms"}]}, "budget": {"stop": {"patience": 2}}},
     "budget.stop", "a multi-objective study cannot stop on them"),
    ({"constraints": {"val_auc": {"max": 1}}}, "constraints.val_auc", "must be one of n_params, latency_p50_ms"),
    ({"constraints": {"latency_p50_ms": {}}}, "constraints.latency_p50_ms", "give min, max or both"),
    ({"constraints": {"latency_p50_ms": {"max": 1.0}}}, "constraints", "the random sampler cannot steer around constraints"),
    ({"registry": {"limits": {"gpu_hours": {"max": 1}}}}, "registry.limits.gpu_hours", "or one of n_params"),
    ({"engine": "keras_tuner", "warm_start": {"from": "x"}}, "warm_start", "applies to engine: optuna"),
    ({"warm_start": {"from": "@sqlite:///x.db"}}, "warm_start.from", "needs a study name before @"),
    ({"warm_start": {"from": "a@sqlite:///x.db", "storage": "sqlite:///y.db"}}, "warm_start.from", "warm_start.storage is set too"),
])
def test_bad_search_settings_name_their_key(sections, key, message, tiny_space, write_config):
    sections = dict(sections)
    if sections.get("engine") == "keras_tuner":
        sections |= {"sampler": None, "pruner": None}
    cfg = {k: v for k, v in tiny_config(tiny_space, **sections).items() if v is not None}
    path = write_config(cfg)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert f"{path}: {key}: " in text and message in text, text


# -- the whole loop: run, stop, constraints, limits, then a warm start -----------------------
def test_run_measures_serving_costs_stops_registers_within_limits_and_warm_starts(home, tiny_space, write_config, capsys):
    from mlflow import MlflowClient

    from studies.run import main as run_main

    storage = f"sqlite:///{home / 'optuna.db'}"
    cfg = tiny_config(tiny_space, study={"name": "serve_aware", "seed": 3},
                      budget={"n_trials": 6, "stop": {"target": 10.0}},  # any finished trial stops it
                      sampler={"type": "tpe", "options": {"n_startup_trials": 2}},
                      constraints={"n_params": {"max": 100_000}}, registry={"model_name": "sa", "limits": {"latency_p50_ms": {"max": 50}}})
    path = write_config(cfg, "sa.yaml")
    assert run_main([str(path)]) == 0
    out = capsys.readouterr()
    assert "study stopped: target reached: trial 0" in out.out
    assert "stopped    target reached" in out.out and "registered as sa v1" in out.out
    study = optuna.load_study(study_name="serve_aware", storage=storage)
    [trial] = study.trials
    for key in ("latency_p50_ms", "latency_batch64_ms", "model_bytes"):
        assert 0 < trial.user_attrs[key] < (50 if key != "model_bytes" else 1e6), (key, trial.user_attrs[key])
    assert trial.constraints == {"n_params_max": trial.user_attrs["n_params"] - 100_000}
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["workbench.stop_reason"].startswith("target reached")
    assert client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics["latency_p50_ms"] == trial.user_attrs["latency_p50_ms"]

    # the trial timed POST /predict on the API; the registered model, loaded as a server loads it,
    # answers there in the same order of magnitude (benchmarks/trial_cost.py: a served process)
    import numpy as np

    from serving.model import load
    from serving.probe import predict_bodies, probe
    from serving.store import Store

    served = load("models:/sa@champion", Store(f"sqlite:///{home / 'mlflow.db'}"))
    assert served.info["runtime"] == "numpy"
    rows = np.random.default_rng(0).normal(size=(64, served.input_width)).astype(np.float32)
    latency = probe().confirm(served, *predict_bodies(rows, served.table), bursts=3)  # one burst's order can flip under load
    assert 0.02 < trial.user_attrs["latency_p50_ms"] < 50 and 0.2 < latency.p50_ms / trial.user_attrs["latency_p50_ms"] < 5
    assert latency.batch64_ms > latency.p50_ms

    # a resumed study knows it stopped; a higher budget runs on, warm-started from itself is refused
    assert run_main([str(path)]) == 0
    assert "stopped early (target reached" in capsys.readouterr().err
    assert run_main([str(path), "--warm-start-from", "serve_aware"]) == 2
    assert "sa.yaml: warm_start.from: is this study itself" in capsys.readouterr().err

    # a new study starts from it on a wider space: its best trial runs first, and to the end under
    # a pruner that prunes every other trial at its first report; lineage on study and run
    wide = tiny_space.parent / "wide.yaml"
    wide.write_text(tiny_space.read_text().replace("high: 16", "high: 32").replace("[adam, sgd]", "[adam, sgd, rmsprop]"))
    cfg2 = tiny_config(wide, study={"name": "warm", "seed": 3}, budget={"n_trials": 2}, registry={"auto": False},
                       pruner={"type": "threshold", "options": {"upper": 0.0}})
    assert run_main([str(write_config(cfg2, "warm.yaml")), "--warm-start-from", "serve_aware"]) == 0
    assert "warm start: 1 of 1 finished trials of 'serve_aware' (space changed" in capsys.readouterr().err
    warm = optuna.load_study(study_name="warm", storage=storage)
    assert warm.trials[0].user_attrs["warm_start_of"] == "serve_aware#0" and warm.trials[0].params == trial.params
    assert warm.trials[0].value == pytest.approx(trial.value, rel=1e-5)  # same params, same seed: same model
    assert [t.state.name for t in warm.trials] == ["COMPLETE", "PRUNED"]
    assert warm.user_attrs[WARM_START_ATTR]["source"] == "serve_aware"
    parent = client.get_run(warm.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["workbench.warm_start.source"] == "serve_aware"
