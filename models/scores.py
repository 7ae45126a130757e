"""A model's compiled metrics computed in numpy from its predictions: the values Keras's metric
objects give (tests/unit/test_models.py compares them with `model.evaluate`), without their
eager cost. An AUC updated eagerly in Keras costs ~50 ms a call on a small split (200
thresholds' confusion variables), and a trial evaluates each epoch's validation split and then
validation and test once more; in numpy the same counts take well under a millisecond.

`numpy_metric(metric)` returns the function for a metric it mirrors, None for any other (the
caller then updates the Keras object itself); `numpy_loss` and `numpy_penalty` do the same for the
compiled loss and the weights' regularizers (through Keras ops, ~0.6 ms of each evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Score = Callable[[np.ndarray, np.ndarray], float]  # (y_true, y_pred) -> value


def numpy_metric(metric: Any) -> Score | None:
    """The numpy twin of a Keras metric object of the kinds the model families compile, as it is
    configured; None for anything else (another kind, weights, logits, given thresholds)."""
    import keras

    config = metric.get_config()
    if isinstance(metric, keras.metrics.AUC):
        plain = (not config.get("multi_label") and config.get("label_weights") is None and not config.get("from_logits")
                 and config.get("summation_method", "interpolation") == "interpolation"
                 and not metric._init_from_thresholds and config.get("curve") in ("ROC", "PR"))
        if not plain:
            return None
        n, curve = int(metric.num_thresholds), config["curve"]
        return lambda y, p: auc(y, p, num_thresholds=n, curve=curve)
    if isinstance(metric, keras.metrics.BinaryAccuracy):
        threshold = float(config.get("threshold", 0.5))
        return lambda y, p: binary_accuracy(y, p, threshold)
    if isinstance(metric, keras.metrics.SparseCategoricalAccuracy):
        return sparse_categorical_accuracy
    if isinstance(metric, keras.metrics.MeanAbsoluteError):
        return mean_absolute_error
    if isinstance(metric, keras.metrics.RootMeanSquaredError):
        return root_mean_squared_error
    return None


Loss = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (y_true, y_pred) -> the loss of each row


def numpy_loss(fn: Any) -> Loss | None:
    """The numpy twin of a Keras loss function the model families compile (by name), per row, on
    predicted probabilities as Keras computes it on a plain tensor; None for any other."""
    import keras

    twins: dict[Any, Loss] = {keras.losses.binary_crossentropy: binary_crossentropy,
                              keras.losses.sparse_categorical_crossentropy: sparse_categorical_crossentropy,
                              keras.losses.mean_squared_error: mean_squared_error}
    return twins.get(fn)


def binary_crossentropy(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    y, p = _aligned(y, p)
    p = _clipped(p)  # in float32, as Keras: 1 - p of a saturated prediction is 1.19e-7, not 1e-7
    y = y.astype(np.float64)
    return -np.mean(y * np.log(p.astype(np.float64)) + (1.0 - y) * np.log((np.float32(1.0) - p).astype(np.float64)), axis=-1)


def _clipped(p: np.ndarray) -> np.ndarray:
    import keras

    eps = np.float32(keras.config.epsilon())
    return np.clip(np.asarray(p, dtype=np.float32), eps, np.float32(1.0) - eps)


def sparse_categorical_crossentropy(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Keras: the log of the clipped probabilities taken as logits of a softmax."""
    logits = np.log(_clipped(p).astype(np.float64))
    labels = np.asarray(y).reshape(len(logits), -1)[:, 0].astype(np.int64)
    top = logits.max(axis=-1)
    normaliser = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
    return normaliser - logits[np.arange(len(logits)), labels]


def mean_squared_error(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    y, p = _aligned(y, p)
    return np.mean((y.astype(np.float64) - p) ** 2, axis=-1)


def numpy_penalty(regularizer: Any) -> Callable[[np.ndarray], float] | None:
    """The numpy twin of a Keras weight regularizer (L1, L2, L1L2 as configured); None for any other."""
    import keras

    if type(regularizer) not in (keras.regularizers.L1, keras.regularizers.L2, keras.regularizers.L1L2):
        return None
    config = regularizer.get_config()
    l1, l2 = float(config.get("l1", 0.0)), float(config.get("l2", 0.0))
    return lambda w: l1 * float(np.sum(np.abs(w), dtype=np.float64)) + l2 * float(np.sum(np.square(w, dtype=np.float64)))


def binary_accuracy(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float:
    y, p = _aligned(y, p)
    return float(np.mean((p > threshold).astype(np.float32) == y.astype(np.float32)))


def sparse_categorical_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    y = np.asarray(y).reshape(len(p), -1)[:, 0]
    return float(np.mean(np.argmax(p, axis=-1) == y.astype(np.int64)))


def mean_absolute_error(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _aligned(y, p)
    return float(np.mean(np.abs(y.astype(np.float64) - p)))


def root_mean_squared_error(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _aligned(y, p)
    return float(np.sqrt(np.mean((y.astype(np.float64) - p) ** 2)))


def auc(y: np.ndarray, p: np.ndarray, *, num_thresholds: int = 200, curve: str = "ROC") -> float:
    """Keras's AUC (interpolation; ROC by the trapezoidal rule, PR by Davis & Goadrich's
    interpolation): confusion counts at `num_thresholds` evenly spaced thresholds, found by
    bucketing each prediction as Keras does."""
    truth = (np.asarray(y).reshape(-1) != 0).astype(np.float64)
    pred = np.clip(np.nan_to_num(np.asarray(p, dtype=np.float32).reshape(-1), nan=0.0), 0.0, 1.0)  # NaN: a diverged model
    # Keras: ceil(p * (n - 1)) - 1 in float32, the first bucket also taking 0 (its thresholds carry an epsilon).
    buckets = np.maximum(np.ceil(pred * np.float32(num_thresholds - 1)) - 1, 0).astype(np.int64)
    tp = np.bincount(buckets, weights=truth, minlength=num_thresholds)[::-1].cumsum()[::-1]
    fp = np.bincount(buckets, weights=1.0 - truth, minlength=num_thresholds)[::-1].cumsum()[::-1]
    fn, tn = truth.sum() - tp, (1.0 - truth).sum() - fp
    if curve == "PR":
        return _interpolated_pr_auc(tp, fp, fn)
    recall, fp_rate = _ratio(tp, tp + fn), _ratio(fp, fp + tn)
    return float(np.sum((fp_rate[:-1] - fp_rate[1:]) * (recall[:-1] + recall[1:]) / 2.0))


def _interpolated_pr_auc(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    dtp = tp[:-1] - tp[1:]
    positive = tp + fp
    dp = positive[:-1] - positive[1:]
    slope = _ratio(dtp, np.maximum(dp, 0))
    intercept = tp[1:] - slope * positive[1:]
    both = (positive[:-1] > 0) & (positive[1:] > 0)
    p_ratio = np.where(both, _ratio(positive[:-1], np.maximum(positive[1:], 0)), 1.0)
    increments = _ratio(slope * (dtp + intercept * np.log(p_ratio)), np.maximum(tp[1:] + fn[1:], 0))
    return float(np.sum(increments))


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (Keras's divide_no_nan)."""
    out = np.zeros(np.broadcast(a, b).shape)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _aligned(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (n,) target against (n, 1) predictions becomes (n, 1)."""
    y, p = np.asarray(y), np.asarray(p)
    if y.ndim == p.ndim - 1 and p.shape[-1] == 1:
        y = y[..., None]
    return y, p
