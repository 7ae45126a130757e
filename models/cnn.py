"""A small convolutional network for image-shaped inputs (flat features reshaped in the model)."""

from __future__ import annotations

from typing import Any

import keras

from models._common import compile_for_task, head, per_layer, regularizer, scaled_input
from models.datasets import DataSpec


def build(params: dict[str, Any], spec: DataSpec) -> keras.Model:
    """Conv blocks with pooling while the image is large enough, then a dense layer and the head."""
    if spec.image_shape is None:
        raise ValueError("the cnn family needs an image-shaped dataset (dataset.image_shape)")
    filters = params.get("filters", 32)
    n_conv = int(params.get("n_conv", len(filters) if isinstance(filters, list) else 2))
    filters = per_layer(filters, n_conv, 32)
    kernels = per_layer(params.get("kernel_size"), n_conv, 3)
    activation = params.get("activation", "relu")
    reg = regularizer(params)
    inputs, x = scaled_input(spec)
    x = keras.layers.Reshape(spec.image_shape, name="image")(x)
    size = min(spec.image_shape[:2])
    for i in range(n_conv):
        x = keras.layers.Conv2D(
            int(filters[i]), int(kernels[i]), padding="same", kernel_regularizer=reg, name=f"conv_{i}"
        )(x)
        if params.get("batch_norm", False):
            x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
        x = keras.layers.Activation(activation, name=f"act_{i}")(x)
        if size >= 4:  # pool while the feature map can still halve to at least 2x2
            x = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(x)
            size //= 2
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(int(params.get("dense_units", 64)), activation=activation, kernel_regularizer=reg, name="dense")(x)
    dropout = float(params.get("dropout", 0.0) or 0.0)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    return compile_for_task(keras.Model(inputs, head(x, spec), name="cnn"), spec, params)
