"""A loaded model: input validation against its signature, and a fast compiled forward pass.

Keras `Model.predict()` costs ~120 ms per call (it builds a dataset and a loop); a `tf.function`
with a fixed input signature answers a single row in well under a millisecond.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.registry import ResolvedModel, ServingError, Store


class InvalidInput(ServingError):
    """The request does not fit the model's signature; the message names the problem."""


@dataclass
class LoadedModel:
    """Everything a prediction needs, immutable once loaded (a reload builds a new one)."""

    resolved: ResolvedModel
    task: str
    feature_names: list[str]
    class_labels: list[Any] | None
    forward: Any  # compiled: float32 [n, n_features] -> float32 [n, n_outputs]
    n_outputs: int = 1
    loaded_at: float = field(default_factory=time.time)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    # -- input -------------------------------------------------------------------------
    def rows_from_instances(self, instances: Sequence[Sequence[float]]) -> np.ndarray:
        """A float32 matrix from positional rows; each row must have one value per feature."""
        if len(instances) == 0:
            raise InvalidInput("instances: must hold at least one row, got []")
        for i, row in enumerate(instances):
            if len(row) != self.n_features:
                raise InvalidInput(f"instances.{i}: the model expects {self.n_features} values "
                                   f"({', '.join(self.feature_names[:5])}{', ...' if self.n_features > 5 else ''}), got {len(row)}")
        return self._finite(np.asarray(instances, dtype=np.float32), "instances")

    def rows_from_records(self, records: Sequence[Mapping[str, float]]) -> np.ndarray:
        """A float32 matrix from named rows, in the model's feature order."""
        if len(records) == 0:
            raise InvalidInput("records: must hold at least one row, got []")
        expected = set(self.feature_names)
        for i, record in enumerate(records):
            if record.keys() != expected:
                missing = sorted(expected - record.keys())
                unknown = sorted(record.keys() - expected)
                parts = ([f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []) + (
                    [f"unknown {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"] if unknown else [])
                raise InvalidInput(f"records.{i}: feature names do not match the model: {'; '.join(parts)}")
        matrix = np.array([[record[n] for n in self.feature_names] for record in records], dtype=np.float32)
        return self._finite(matrix, "records")

    def _finite(self, x: np.ndarray, key: str) -> np.ndarray:
        bad = ~np.isfinite(x)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            raise InvalidInput(f"{key}.{row}: {self.feature_names[col]!r} must be a finite number, got {x[row, col]}")
        return x

    # -- output ------------------------------------------------------------------------
    def predict_arrays(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(predictions, class probabilities or None) as arrays: the batch path, no Python lists."""
        out = np.asarray(self.forward(x))
        if self.task == "regression":
            return out[:, 0], None
        probs = np.stack([1.0 - out[:, 0], out[:, 0]], axis=1) if self.task == "binary" else out
        labels = np.asarray(self.classes, dtype=object)
        return labels[probs.argmax(axis=1)], probs

    @property
    def classes(self) -> list[Any]:
        """The class of each probability column (indices if the model carries no labels)."""
        return self.class_labels or list(range(2 if self.task == "binary" else self.n_outputs))

    def predict(self, x: np.ndarray) -> dict[str, Any]:
        """Predictions for a validated matrix: labels and class probabilities, or values (JSON-ready)."""
        predictions, probs = self.predict_arrays(x)
        if probs is None:
            return {"predictions": predictions.tolist()}
        return {"predictions": predictions.tolist(), "probabilities": probs.round(6).tolist(), "classes": self.classes}


def load(uri: str, store: Store) -> LoadedModel:
    """Resolve, download and compile a model logged by the workbench (a Keras MLflow model)."""
    resolved = store.resolve(uri)
    path = store.download(resolved)
    return from_directory(path, resolved)


def from_directory(path: Path, resolved: ResolvedModel) -> LoadedModel:
    """Load an MLflow Keras model directory and compile its forward pass."""
    import keras
    import tensorflow as tf
    import yaml

    mlmodel = path / "MLmodel"
    if not mlmodel.is_file():
        raise ServingError(f"{resolved.uri}: no MLmodel file in {path}")
    meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    if "feature_names" not in meta or "task" not in meta:
        raise ServingError(f"{resolved.uri}: not a workbench model (its MLmodel metadata lacks feature_names/task)")
    model = keras.saving.load_model(path / "data" / "model.keras", compile=False)
    n = len(meta["feature_names"])

    @tf.function(input_signature=[tf.TensorSpec([None, n], tf.float32)], reduce_retracing=True)
    def forward(x):
        return model(x, training=False)

    n_outputs = int(forward(np.zeros((1, n), dtype=np.float32)).shape[1])  # traces now, not on the first request
    from serving.fastpath import numpy_forward

    fast = numpy_forward(model)
    if fast is not None:
        # Use the numpy path only if it gives Keras' answers on varied rows.
        probe = np.random.default_rng(0).normal(size=(64, n)).astype(np.float32) * 3
        if np.allclose(fast(probe), np.asarray(forward(probe)), rtol=1e-4, atol=1e-5):
            forward = fast
    info = {key.removeprefix("workbench."): value for key, value in resolved.tags.items() if key.startswith("workbench.")}
    return LoadedModel(resolved, meta["task"], list(meta["feature_names"]), meta.get("class_labels"), forward,
                       n_outputs=n_outputs, info=info)
