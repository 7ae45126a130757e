"""Search spaces: a YAML schema, its validation, and its compilation to Optuna distributions."""

from search_spaces._compile import (
    compile_space,
    conditions_hold,
    from_flat,
    grid_values,
    optuna_suggest,
    sample,
    to_distribution,
)
from search_spaces._keras_tuner import keras_tuner_problems, params_from_values, to_hyperparameters
from search_spaces._load import load_space, parse_space
from search_spaces._schema import (
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    SearchSpace,
)
from search_spaces.errors import ConfigError, WorkbenchError

__all__ = [
    "CategoricalParam",
    "ConfigError",
    "FixedParam",
    "FloatParam",
    "IntParam",
    "SearchSpace",
    "WorkbenchError",
    "compile_space",
    "conditions_hold",
    "from_flat",
    "grid_values",
    "keras_tuner_problems",
    "load_space",
    "optuna_suggest",
    "params_from_values",
    "parse_space",
    "sample",
    "to_distribution",
    "to_hyperparameters",
]
