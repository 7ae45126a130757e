"""Keras layers of the workbench's own, registered so that a saved model loads without unsafe code.

Importing this module registers them (serving.model imports it before loading a network).
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="workbench")
class Columns(keras.layers.Layer):
    """The given columns of a [batch, width] input, in order (a table's column block)."""

    def __init__(self, indices: list[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.indices = [int(i) for i in indices]

    def call(self, inputs):
        start, stop = self.indices[0], self.indices[-1] + 1
        if self.indices == list(range(start, stop)):  # a contiguous block: a slice, no gather
            return inputs[:, start:stop]
        return keras.ops.take(inputs, self.indices, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], len(self.indices))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "indices": self.indices}
