"""Pieces every family shares: the input with its saved scaling, the task head, compilation."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from models.datasets import DataSpec
from models.layers import TableView


def per_layer(value: Any, n: int, default: Any) -> list[Any]:
    """A per-layer setting as a list of n values (a scalar repeats)."""
    if value is None:
        value = default
    if isinstance(value, (list, tuple)):
        if len(value) < n:
            raise ValueError(f"need {n} per-layer values, got {len(value)}")
        return list(value[:n])
    return [value] * n


def regularizer(params: dict[str, Any]) -> keras.regularizers.Regularizer | None:
    l2 = float(params.get("l2") or 0.0)
    return keras.regularizers.L2(l2) if l2 > 0 else None


def scaled_input(spec: DataSpec) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """The raw-feature input and its standardised view; the scaling is part of the model."""
    inputs = keras.Input(shape=(spec.n_features,), name="features", dtype="float32")
    norm = keras.layers.Normalization(
        mean=np.asarray(spec.feature_mean, dtype="float32"),
        variance=np.asarray(spec.feature_var, dtype="float32"),
        name="scaling",
    )
    return inputs, norm(inputs)


def table_view(x: keras.KerasTensor, spec: DataSpec, params: dict[str, Any]) -> keras.KerasTensor:
    """A mixed-type table's encoded columns as the network takes them, per the searchable choices
    (one models.layers.TableView): `numeric_scaling` standard (as encoded) or robust (median/IQR
    of the training split, an affine map of the standardised values), `categorical_encoding`
    one_hot (as encoded) or embedding: each categorical column's one-hot block through its own
    bias-free kernel of `embedding_dim` units (at most the block's width), which is an embedding
    lookup. The encoding itself (models.tabular) never changes, so it is computed once per study
    and serving needs nothing per trial."""
    table = spec.table
    if table is None:
        return x
    shift, var, j = np.zeros(table.width), np.ones(table.width), 0
    robust = params.get("numeric_scaling", "standard") == "robust"
    dim = int(params.get("embedding_dim", 4))
    dense: list[int] = []
    blocks: list[list[int]] = []
    for c in table.columns:
        if robust and c.kind == "numeric":  # (raw - median)/iqr == (z - (median - mean)/std) / (iqr/std)
            shift[j], var[j] = (c.median - c.mean) / c.std, (c.iqr / c.std) ** 2
        if c.kind == "categorical":
            blocks.append([j, c.n_outputs, min(dim, c.n_outputs)])
        else:
            dense += list(range(j, j + c.n_outputs))
        j += c.n_outputs
    embedding = params.get("categorical_encoding", "one_hot") == "embedding"
    return TableView(shift.astype("float32").tolist(), var.astype("float32").tolist(), dense, blocks if embedding else [],
                     name="table_view")(x)


def head(x: keras.KerasTensor, spec: DataSpec) -> keras.KerasTensor:
    """The output layer for the task; regression outputs are rescaled to target units."""
    if spec.task == "binary":
        return keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    if spec.task == "multiclass":
        return keras.layers.Dense(spec.n_classes, activation="softmax", name="probabilities")(x)
    y = keras.layers.Dense(1, name="standardised")(x)
    return keras.layers.Rescaling(scale=spec.target_std, offset=spec.target_mean, name="prediction")(y)


def optimizer(params: dict[str, Any]) -> keras.optimizers.Optimizer:
    """The optimiser named by params (adam, adamw, sgd, rmsprop) with its settings."""
    name = params.get("optimizer", "adam")
    lr = float(params.get("learning_rate", 1e-3))
    momentum = float(params.get("momentum", 0.0) or 0.0)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=float(params.get("weight_decay", 0.004)))
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum, nesterov=bool(params.get("nesterov", False)))
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r} (adam, adamw, sgd, rmsprop)")


def compile_for_task(model: keras.Model, spec: DataSpec, params: dict[str, Any]) -> keras.Model:
    """Compile with the loss and metrics of the task; metric names match the objective names."""
    if spec.task == "binary":
        loss = "binary_crossentropy"
        metrics: list[Any] = [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc"),
                              keras.metrics.AUC(curve="PR", name="pr_auc")]
    elif spec.task == "multiclass":
        loss = "sparse_categorical_crossentropy"
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    else:
        loss = "mse"
        metrics = [keras.metrics.MeanAbsoluteError(name="mae"), keras.metrics.RootMeanSquaredError(name="rmse")]
        # The head rescales to target units, which multiplies every gradient by the target's
        # standard deviation: SGD then diverges on targets in the hundreds. Weighting the loss by
        # 1/std^2 trains (and reports loss) in standardised units; mae/rmse stay in target units.
        model.compile(optimizer=optimizer(params), loss=loss, metrics=metrics, loss_weights=[1.0 / spec.target_std ** 2])
        return model
    model.compile(optimizer=optimizer(params), loss=loss, metrics=metrics)
    return model
