"""Keras model families by name; importing this package does not import Keras.

Builders take a params dict and a DataSpec and know nothing of Optuna or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from models.datasets import Dataset, DatasetError, DataSpec, load_dataset

if TYPE_CHECKING:
    import keras

# Parameters every family accepts: they shape the optimiser and the fit, not the network.
TRAINING_PARAMS = frozenset({"optimizer", "learning_rate", "momentum", "nesterov", "weight_decay", "batch_size"})


@dataclass(frozen=True)
class Family:
    """A model family: the params it reads, the tasks it serves, where its builder lives."""

    name: str
    module: str
    params: frozenset[str]
    needs_image: bool = False

    @property
    def accepted(self) -> frozenset[str]:
        return self.params | TRAINING_PARAMS

    def build(self, params: dict[str, Any], spec: DataSpec) -> keras.Model:
        """Build and compile a fresh model."""
        return import_module(self.module).build(params, spec)


FAMILIES: dict[str, Family] = {
    "mlp": Family(
        "mlp", "models.mlp", frozenset({"n_layers", "units", "dropout", "activation", "batch_norm", "l2",
                                        # a mixed-type table's preprocessing choices (models._common.table_view)
                                        "numeric_scaling", "categorical_encoding", "embedding_dim"})
    ),
    "cnn": Family(
        "cnn",
        "models.cnn",
        frozenset({"n_conv", "filters", "kernel_size", "dense_units", "dropout", "activation", "batch_norm", "l2"}),
        needs_image=True,
    ),
}

__all__ = ["FAMILIES", "TRAINING_PARAMS", "DataSpec", "Dataset", "DatasetError", "Family", "load_dataset"]
