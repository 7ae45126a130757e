"""Multi-layer perceptron for binary, multiclass and regression tasks."""

from __future__ import annotations

from typing import Any

import keras

from models._common import compile_for_task, head, per_layer, regularizer, scaled_input, table_view
from models.datasets import DataSpec


def build(params: dict[str, Any], spec: DataSpec) -> keras.Model:
    """Dense blocks (Dense, optional BatchNorm, activation, Dropout) over standardised features."""
    units = params.get("units", 64)
    n_layers = int(params.get("n_layers", len(units) if isinstance(units, list) else 2))
    units = per_layer(units, n_layers, 64)
    dropout = per_layer(params.get("dropout"), n_layers, 0.0)
    activation = params.get("activation", "relu")
    reg = regularizer(params)
    inputs, x = scaled_input(spec)
    x = table_view(x, spec, params)
    for i in range(n_layers):
        x = keras.layers.Dense(int(units[i]), kernel_regularizer=reg, name=f"dense_{i}")(x)
        if params.get("batch_norm", False):
            x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
        x = keras.layers.Activation(activation, name=f"act_{i}")(x)
        if float(dropout[i]) > 0:
            x = keras.layers.Dropout(float(dropout[i]), name=f"dropout_{i}")(x)
    return compile_for_task(keras.Model(inputs, head(x, spec), name="mlp"), spec, params)
