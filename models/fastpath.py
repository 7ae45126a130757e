"""A numpy forward pass for models made only of dense-style layers (the MLP family).

For one row, a TensorFlow call costs a few hundred microseconds of dispatch; the same arithmetic
in numpy costs a few microseconds. Models with any other layer (convolutions, ...) return None
and keep the compiled TensorFlow path. The result is checked against Keras at load time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Array = np.ndarray


def _activation(name: str) -> Callable[[Array], Array] | None:
    if name == "linear":
        return lambda x: x
    if name == "relu":
        return lambda x: np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh
    if name == "sigmoid":
        from scipy.special import expit  # no overflow warning for large |x|

        return expit
    if name in ("silu", "swish"):
        from scipy.special import expit

        return lambda x: x * expit(x)
    if name == "softmax":
        def softmax(x: Array) -> Array:
            e = np.exp(x - x.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return softmax
    if name == "gelu":  # Keras' default gelu is the exact (erf) form
        from scipy.special import erf

        return lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)).astype(x.dtype))
    return None


def numpy_forward(model) -> Callable[[Array], Array] | None:
    """The model as a chain of numpy steps, or None if it has a layer this does not cover."""
    steps: list[Callable[[Array], Array]] = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in ("InputLayer", "Dropout"):
            continue
        if kind == "Normalization":
            mean = np.asarray(layer.mean, dtype=np.float32).reshape(1, -1)
            scale = np.maximum(np.sqrt(np.asarray(layer.variance, dtype=np.float32)), 1e-7).reshape(1, -1)

            def normalize(x: Array, m: Array = mean, s: Array = scale) -> Array:
                return (x - m) / s

            steps.append(normalize)
        elif kind == "Dense":
            kernel, *bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
            act = _activation(layer.activation.__name__)
            if act is None:
                return None
            b = bias[0] if bias else np.zeros(kernel.shape[1], dtype=np.float32)

            def dense(x: Array, k: Array = kernel, b: Array = b, a: Callable[[Array], Array] = act) -> Array:
                return a(x @ k + b)

            steps.append(dense)
        elif kind == "Activation":
            act = _activation(layer.activation.__name__)
            if act is None:
                return None
            steps.append(act)
        elif kind == "BatchNormalization":
            gamma, beta, mean, var = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
            scale = gamma / np.sqrt(var + layer.epsilon)

            def batch_norm(x: Array, s: Array = scale, o: Array = beta - mean * scale) -> Array:
                return x * s + o

            steps.append(batch_norm)
        elif kind == "Rescaling":
            factor, offset = np.float32(layer.scale), np.float32(layer.offset)

            def rescale(x: Array, s: np.float32 = factor, o: np.float32 = offset) -> Array:
                return x * s + o

            steps.append(rescale)
        else:
            return None

    def forward(x: Array) -> Array:
        for step in steps:
            x = step(x)
        return x

    return forward
