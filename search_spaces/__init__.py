"""Search spaces: a YAML schema, its validation, and its compilation to Optuna distributions.

Depends on Optuna and pydantic only; mistakes in a space file are `SpaceError`s.
"""

from search_spaces._compile import (
    compile_space,
    conditions_hold,
    from_flat,
    grid_values,
    optuna_suggest,
    sample,
    to_distribution,
)
from search_spaces._hyperparameters import keras_tuner_problems, params_from_values, to_hyperparameters
from search_spaces._load import load_space, parse_space, read_yaml
from search_spaces._params import (
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    SearchSpace,
)
from search_spaces._problems import FieldError, SpaceError, problems_from_validation
from search_spaces._transfer import Transferred, transfer

__all__ = [
    "CategoricalParam",
    "FieldError",
    "FixedParam",
    "FloatParam",
    "IntParam",
    "SearchSpace",
    "SpaceError",
    "Transferred",
    "compile_space",
    "conditions_hold",
    "from_flat",
    "grid_values",
    "keras_tuner_problems",
    "load_space",
    "optuna_suggest",
    "params_from_values",
    "parse_space",
    "problems_from_validation",
    "read_yaml",
    "sample",
    "to_distribution",
    "to_hyperparameters",
    "transfer",
]
