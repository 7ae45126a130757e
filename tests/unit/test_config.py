"""Study config loading: every shipped file, interpolation, overrides, and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import ConfigError
from search_spaces import compile_space, load_space
from studies.config import interpolate, load_config
from tests.conftest import ROOT, tiny_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_compiles(path: Path):
    loaded = load_config(path, environ={})
    assert compile_space(loaded.space)
    assert loaded.study_name


def test_a_config_ships_for_every_bundled_dataset():
    from models.datasets import BUNDLED

    names = {load_config(p, environ={}).config.dataset.name for p in CONFIGS}
    assert set(BUNDLED) <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_uses_every_feature(path: Path):
    space = load_space(path)
    kinds = {type(p).__name__ for p in space.params.values()}
    assert {"FloatParam", "IntParam", "CategoricalParam"} <= kinds
    assert any(getattr(p, "log", False) for p in space.params.values())
    assert any(getattr(p, "step", None) not in (None, 1) for p in space.params.values())
    assert any(p.when for p in space.params.values())
    assert any(p.per_layer for p in space.params.values())


def test_interpolation():
    env = {"A": "x", "EMPTY": ""}
    assert interpolate({"k": "${A}", "l": ["${B:-d}", "${EMPTY:-e}", "${EMPTY-f}", "p${A}q"]}, environ=env) == {
        "k": "x", "l": ["d", "e", "", "pxq"]}
    with pytest.raises(ConfigError, match=r"a.b: environment variable NOPE is not set"):
        interpolate({"a": {"b": "${NOPE}"}}, environ={})


def test_storage_comes_from_the_environment(write_config, tiny_space):
    cfg = tiny_config(tiny_space)
    cfg["study"]["storage"] = "${OPTUNA_STORAGE:-sqlite:///fallback.db}"
    path = write_config(cfg)
    assert load_config(path, environ={}).config.study.storage == "sqlite:///fallback.db"
    assert load_config(path, environ={"OPTUNA_STORAGE": "postgresql://h/db"}).config.study.storage == "postgresql://h/db"


def test_overrides_are_validated_like_the_file(write_config, tiny_space):
    path = write_config(tiny_config(tiny_space))
    loaded = load_config(path, ["training.epochs=7", "sampler.options.n_startup_trials=2", "sampler.type=tpe"])
    assert loaded.config.training.epochs == 7
    assert loaded.config.sampler.options == {"n_startup_trials": 2}
    with pytest.raises(ConfigError) as info:
        load_config(path, ["training.epochs=zero"])
    assert str(info.value) == (
        f"{path}: training.epochs: Input should be a valid integer, unable to parse string as an integer, "
        "got 'zero' (from --set training.epochs)"
    )
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(path, ["training.epochs"])


def test_changing_the_sampler_type_drops_the_files_options_for_the_old_type(write_config, tiny_space):
    # `--set sampler.type=random` on a TPE config (README: configs/wine.yaml) used to stop with
    # "sampler.options.n_startup_trials: not an option of RandomSampler".
    path = write_config(tiny_config(tiny_space, sampler={"type": "tpe", "options": {"n_startup_trials": 5}},
                                    pruner={"type": "median", "options": {"n_warmup_steps": 2}}))
    loaded = load_config(path, ["sampler.type=random", "pruner.type=none"])
    assert (loaded.config.sampler.type, loaded.config.sampler.options) == ("random", {})
    assert (loaded.config.pruner.type, loaded.config.pruner.options) == ("none", {})
    kept = load_config(path, ["sampler.type=tpe", "pruner.type=percentile", "pruner.options.percentile=30"])
    assert kept.config.sampler.options == {"n_startup_trials": 5}  # same type: the file's options stay
    assert kept.config.pruner.options == {"percentile": 30}


def test_search_space_path_is_relative_to_the_config(tmp_path, write_config):
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "s.yaml").write_text("params: {n_layers: {type: int, low: 1, high: 2}}\n")
    cfg = tiny_config(Path("spaces/s.yaml"))
    assert load_config(write_config(cfg)).space_path == tmp_path / "spaces" / "s.yaml"


def _error(write_config, tiny_space, **changes) -> str:
    cfg = tiny_config(tiny_space)
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(last)
        else:
            node[last] = value
    path = write_config(cfg)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    assert text.startswith(str(path)) or text.startswith(str(tiny_space))
    return text


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"extra": 1}, "extra: unknown key"),
        ({"training__epochs": 0}, "training.epochs: Input should be greater than or equal to 1, got 0"),
        ({"training__epochs": "many"}, "training.epochs: Input should be a valid integer"),
        ({"training__epoch": 3}, "training.epoch: unknown key"),
        ({"dataset": ...}, "dataset: required key is missing"),
        ({"sampler__type": "bayes"}, "sampler.type: Input should be 'tpe', 'random', 'cmaes', 'gp', 'qmc', 'grid' or 'nsga2', got 'bayes'"),
        ({"pruner__type": "early"}, "pruner.type: Input should be 'none', 'median'"),
        ({"model__family": "transformer"}, "model.family: must be one of cnn, mlp, got 'transformer'"),
        ({"dataset__name": "mnist"}, "dataset.name: must be one of breast_cancer, diabetes, digits, iris, wine, got 'mnist'"),
        ({"dataset__path": "x.csv"}, "dataset.name: give exactly one of name"),
        ({"model__task": "regression"}, "model.task: 'breast_cancer' is a binary dataset, got 'regression'"),
        ({"model__family": "cnn"}, "model.family: 'cnn' needs image-shaped data"),
        ({"objective": {"metric": "val_rmse"}}, "objective.metric: must be one of val_loss, val_accuracy, val_auc, val_pr_auc, n_params, latency_p50_ms, latency_batch64_ms, model_bytes for a binary task, got 'val_rmse'"),
        ({"dataset": {"name": "diabetes"}, "model": {"family": "mlp", "task": "regression"}, "training": {"class_weight": "balanced"}},
         "training.class_weight: applies to classification tasks (binary, multiclass), got 'balanced' for a regression task"),
        ({"training__class_weight": "inverse"}, "training.class_weight: Input should be 'balanced'"),
        ({"dataset__columns": {"a": "numeric"}}, "dataset.columns: column kinds apply to a file dataset (path), not to a bundled one"),
        ({"objective": {"metric": "val_loss", "metrics": [{"name": "val_loss"}]}}, "objective.metric: give exactly one of metric"),
        ({"objective": {"metrics": [{"name": "val_loss"}, {"name": "n_params"}]}, "pruner": {"type": "median"}}, "pruner.type: Optuna cannot prune multi-objective studies"),
        ({"objective": {"metrics": [{"name": "val_loss"}, {"name": "val_loss"}]}}, "objective.metrics.1.name: must be unique"),
        ({"objective": {"metrics": [{"name": "val_loss"}, {"name": "n_params"}]}, "pruner": {"type": "none"}, "sampler": {"type": "cmaes"}},
         "sampler.type: 'cmaes' handles a single objective only"),
        ({"sampler__options": {"n_startup": 3}}, "sampler.options.n_startup: not an option of RandomSampler (options: none)"),
        ({"sampler": {"type": "tpe", "options": {"seed": 3}}}, "sampler.options.seed: not an option of TPESampler"),
        ({"sampler": {"type": "tpe", "options": {"n_ei_candidates": "lots"}}}, "sampler.options.n_ei_candidates: TPESampler(n_ei_candidates=...) needs int: Input should be a valid integer, unable to parse string as an integer, got 'lots'"),
        ({"pruner": {"type": "percentile", "options": {"percentile": 150}}}, "pruner.options: PercentilePruner rejected these options"),
        ({"pruner": {"type": "percentile"}}, "pruner.options: PercentilePruner rejected these options"),
        ({"pruner": {"type": "patient", "options": {}}}, "pruner.options.patience: required key is missing"),
        ({"pruner": {"type": "median", "wrapped": {"type": "none"}}}, "pruner.wrapped: only the patient pruner wraps another pruner"),
        ({"sampler": {"type": "grid"}}, "params.learning_rate: the grid sampler needs a finite grid"),
        ({"search_space": "missing.yaml"}, "search_space: file not found"),
        ({"budget__n_trials": -1}, "budget.n_trials: Input should be greater than or equal to 1, got -1"),
        ({"dataset__split": {"validation": 0.5, "test": 0.5}}, "dataset.split.test: validation + test must be < 0.9"),
        ({"tracking": {"log_models": "none"}}, "registry.auto: registering the winner needs its model"),
        ({"registry": {"primary": "val_auc"}}, "registry.primary: must be one of the objective metrics (val_loss), got 'val_auc'"),
    ],
)
def test_config_errors(write_config, tiny_space, changes, expected):
    assert expected in _error(write_config, tiny_space, **changes)


def test_ranking_metrics_are_maximised_by_default(write_config, tiny_space):
    loaded = load_config(write_config(tiny_config(tiny_space, objective={"metric": "val_pr_auc"})))
    assert loaded.config.directions == ["maximize"]


def test_space_params_must_belong_to_the_family(write_config, tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("params: {heads: {type: int, low: 1, high: 4}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tiny_config(space)))
    assert str(info.value).startswith(f"{space}: params.heads: not a parameter of model family 'mlp'")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections, got int"):
        load_config(scalar)
