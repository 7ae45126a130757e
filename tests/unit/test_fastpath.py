"""The numpy fast path gives Keras' answers for every dense-style layer, and steps aside otherwise."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models import FAMILIES, load_dataset
from models.fastpath import numpy_forward
from models.training import fit


@pytest.mark.parametrize(
    ("dataset", "family", "params"),
    [
        ("breast_cancer", "mlp", {"units": [16, 8], "activation": "gelu", "batch_norm": True, "dropout": [0.2, 0.1]}),
        ("wine", "mlp", {"units": [8], "activation": "tanh"}),
        ("iris", "mlp", {"units": [8], "activation": "silu"}),
        ("diabetes", "mlp", {"units": [8, 8], "activation": "relu", "batch_norm": True}),
    ],
)
def test_numpy_path_matches_keras(dataset, family, params):
    data = load_dataset(name=dataset, seed=0)
    keras.utils.set_random_seed(0)
    model = FAMILIES[family].build(params, data.spec)
    fit(model, data, epochs=1, batch_size=32)  # moves batch-norm statistics away from their defaults
    fast = numpy_forward(model)
    assert fast is not None
    np.testing.assert_allclose(fast(data.x_test), np.asarray(model(data.x_test, training=False)), rtol=1e-4, atol=1e-4)


def test_other_layers_keep_the_tensorflow_path():
    data = load_dataset(name="digits", seed=0)
    model = FAMILIES["cnn"].build({"n_conv": 1, "filters": [4]}, data.spec)
    assert numpy_forward(model) is None
