"""The workbench's TPE sampler chooses as Optuna's does, reading the study's trials once per trial."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search_spaces import load_space, optuna_suggest, sample
from studies.config.samplers import build_sampler
from studies.config.sections import SamplerSection

ROOT = Path(__file__).resolve().parents[2]
SPACE = load_space(ROOT / "search_spaces" / "mlp.yaml")  # conditional parameters: several groups
OPTIONS = {"n_startup_trials": 5, "multivariate": True, "group": True}


def _objective(trial: optuna.Trial) -> float:
    params = sample(SPACE, optuna_suggest(trial))
    return float(params["learning_rate"]) * params["n_layers"] + (0.1 if params["optimizer"] == "sgd" else 0.0)


def _run(sampler: optuna.samplers.BaseSampler, url: str, n_trials: int = 16) -> tuple[list[dict], int]:
    """The trials' params, and how often the storage read the study's trials."""
    storage = optuna.storages.RDBStorage(url)
    reads = 0
    original = storage._get_trials

    def counting(*args, **kwargs):
        nonlocal reads
        reads += 1
        return original(*args, **kwargs)

    storage._get_trials = counting
    study = optuna.create_study(storage=storage, sampler=sampler)
    study.optimize(_objective, n_trials=n_trials)
    return [t.params for t in study.trials], reads


def test_the_tpe_sampler_chooses_as_optunas_and_reads_trials_once_per_trial(tmp_path):
    ours = build_sampler(SamplerSection(type="tpe", options=OPTIONS), 7, SPACE, "mlp.yaml")
    assert isinstance(ours, optuna.samplers.TPESampler) and ours._constant_liar
    theirs = optuna.samplers.TPESampler(seed=7, constant_liar=True, **OPTIONS)
    our_params, our_reads = _run(ours, f"sqlite:///{tmp_path / 'ours.db'}")
    their_params, their_reads = _run(theirs, f"sqlite:///{tmp_path / 'theirs.db'}")
    assert our_params == their_params
    assert len({p["n_layers"] for p in our_params}) > 1 and any("momentum" in p for p in our_params)  # groups vary
    # Optuna: one read for each group of parameters sampled after the startup trials, and more.
    assert our_reads <= 3 * 16 < their_reads


def test_the_tpe_sampler_takes_warm_start_priors_through_its_snapshot(tmp_path):
    from studies.engines.priors import with_priors

    source = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    source.optimize(_objective, n_trials=8)
    sampler = with_priors(build_sampler(SamplerSection(type="tpe", options=OPTIONS), 3, SPACE, "mlp.yaml"),
                          source.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", sampler=sampler)
    seen = []
    original = optuna.samplers.TPESampler._sample

    def spying(self, study_view, trial, search_space):
        seen.append(len(study_view._get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))))
        return original(self, study_view, trial, search_space)

    optuna.samplers.TPESampler._sample = spying
    try:
        study.optimize(_objective, n_trials=2)
    finally:
        optuna.samplers.TPESampler._sample = original
    assert seen and min(seen) >= 8  # the priors count as finished trials: TPE samples from the first trial


def test_tpes_log_cdf_is_computed_in_c_with_optunas_values_and_choices(tmp_path, monkeypatch):
    """studies.config.tpe_kernels: building a TPE sampler points Optuna's truncated normal at
    scipy's log_ndtr; the values are Optuna's own, and so are a seeded study's choices."""
    import numpy as np
    from optuna.samplers._tpe import _truncnorm

    from studies.config import tpe_kernels

    build_sampler(SamplerSection(type="tpe", options=OPTIONS), 7, SPACE, "mlp.yaml")
    assert _truncnorm._log_ndtr is tpe_kernels.log_ndtr
    x = np.concatenate([np.linspace(-40, 40, 40_001), [-20, 6, 0.0, -0.0, np.inf, -np.inf, np.nan]])
    python = np.frompyfunc(_truncnorm._log_ndtr_single, 1, 1)(x).astype(float)
    ours = tpe_kernels.log_ndtr(x)
    assert np.array_equal(np.isnan(ours), np.isnan(python)) and np.allclose(ours, python, rtol=1e-7, atol=1e-12, equal_nan=True)
    choices = {}
    for kernel in ("optuna", "ours"):
        if kernel == "optuna":
            monkeypatch.setattr(_truncnorm, "_log_ndtr", lambda a: np.frompyfunc(_truncnorm._log_ndtr_single, 1, 1)(a).astype(float))
        else:
            monkeypatch.setattr(_truncnorm, "_log_ndtr", tpe_kernels.log_ndtr)
        sampler = optuna.samplers.TPESampler(seed=5, **OPTIONS)
        choices[kernel] = _run(sampler, f"sqlite:///{tmp_path / f'{kernel}.db'}", n_trials=24)[0]
    # the same draws; a float may differ in its last bits (sampling inverts the CDF through it)
    assert len(choices["ours"]) == len(choices["optuna"]) == 24
    for ours_, theirs_ in zip(choices["ours"], choices["optuna"], strict=True):
        assert ours_.keys() == theirs_.keys()
        assert all(ours_[k] == pytest.approx(theirs_[k], rel=1e-12) if isinstance(ours_[k], float) else ours_[k] == theirs_[k]
                   for k in ours_), (ours_, theirs_)
