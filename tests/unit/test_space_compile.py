"""Compiling spaces to Optuna distributions, and sampling conditional and per-layer params."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search_spaces import FieldError, compile_space, from_flat, grid_values, optuna_suggest, parse_space, sample

SPACE = parse_space(
    {
        "params": {
            "n_layers": {"type": "int", "low": 1, "high": 3},
            "units": {"type": "int", "low": 8, "high": 64, "log": True, "per_layer": "n_layers"},
            "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
            "use_momentum": {"type": "categorical", "choices": [True, False], "when": {"optimizer": "sgd"}},
            "momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"use_momentum": True}},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25},
            "batch_size": {"type": "fixed", "value": 32},
        }
    },
    "s.yaml",
)


def test_compile_expands_per_layer_and_skips_fixed():
    dists = compile_space(SPACE)
    assert list(dists) == ["n_layers", "units_0", "units_1", "units_2", "optimizer", "use_momentum", "momentum", "lr", "dropout"]
    assert dists["units_2"] == IntDistribution(8, 64, log=True)
    assert dists["lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert dists["dropout"] == FloatDistribution(0.0, 0.5, step=0.25)
    assert dists["use_momentum"] == CategoricalDistribution((True, False))


def test_sampling_follows_conditions_and_layers():
    def pick(values):
        return lambda name, dist: values[name]

    adam = sample(SPACE, pick({"n_layers": 2, "units_0": 16, "units_1": 8, "optimizer": "adam", "lr": 0.01, "dropout": 0.25}))
    assert adam == {"n_layers": 2, "units": [16, 8], "optimizer": "adam", "lr": 0.01, "dropout": 0.25, "batch_size": 32}
    sgd_off = sample(SPACE, pick({"n_layers": 1, "units_0": 16, "optimizer": "sgd", "use_momentum": False, "lr": 0.01, "dropout": 0.0}))
    assert "use_momentum" in sgd_off and "momentum" not in sgd_off  # the chain stops at use_momentum
    sgd_on = sample(SPACE, pick({"n_layers": 1, "units_0": 16, "optimizer": "sgd", "use_momentum": True, "momentum": 0.7, "lr": 0.01, "dropout": 0.0}))
    assert sgd_on["momentum"] == 0.7


def test_sampling_with_optuna_stays_inside_the_distributions():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    dists = compile_space(SPACE)
    seen_momentum = seen_no_optimizer_params = False
    for _ in range(40):
        trial = study.ask()
        params = sample(SPACE, optuna_suggest(trial))
        study.tell(trial, 0.0)
        assert len(params["units"]) == params["n_layers"]
        for name, value in trial.params.items():
            assert dists[name]._contains(dists[name].to_internal_repr(value))
        seen_momentum |= "momentum" in params
        seen_no_optimizer_params |= params["optimizer"] == "adam" and "use_momentum" not in params
        assert ("momentum" in params) == (params.get("use_momentum") is True)
    assert seen_momentum and seen_no_optimizer_params


def test_from_flat_rebuilds_a_trial():
    flat = {"n_layers": 2, "units_0": 16, "units_1": 8, "optimizer": "adam", "lr": 0.01, "dropout": 0.5}
    assert from_flat(SPACE, flat)["units"] == [16, 8]
    with pytest.raises(KeyError, match="units_1"):
        from_flat(SPACE, {"n_layers": 2, "units_0": 16})


def test_grid_values():
    grid_space = parse_space(
        {"params": {"a": {"type": "int", "low": 1, "high": 3}, "b": {"type": "float", "low": 0, "high": 1, "step": 0.5},
                    "c": {"type": "categorical", "choices": ["x", "y"]}}},
        "g",
    )
    assert grid_values(grid_space) == {"a": [1, 2, 3], "b": [0.0, 0.5, 1.0], "c": ["x", "y"]}
    with pytest.raises(FieldError, match="grid sampler needs a finite grid") as info:
        grid_values(SPACE)
    assert info.value.field == "params.units"
