"""A loaded model: input validation against its signature, and a fast forward pass.

A dense network runs as the numpy program it was exported as at logging (models.numpy_net: no
TensorFlow in the process); any other runs as a `tf.function` with a fixed input signature
(Keras `Model.predict()` costs ~120 ms per call, the compiled call well under a millisecond).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.contract import NUMPY_FILE, ContractError, ModelContract
from models.inference import CompiledForward
from serving.store import ResolvedModel, ServingError, Store, discard

if TYPE_CHECKING:
    from models.tabular import EncodedRows, TableEncoder


class InvalidInput(ServingError):
    """The request does not fit the model's signature; the message names the problem."""


@dataclass
class LoadedModel:
    """Everything a prediction needs, immutable once loaded (a reload builds a new one)."""

    resolved: ResolvedModel
    task: str
    feature_names: list[str]
    class_labels: list[Any] | None
    forward: Any  # compiled: float32 [n, input_width] -> float32 [n, n_outputs]
    n_outputs: int = 1
    loaded_at: float = field(default_factory=time.time)
    info: dict[str, Any] = field(default_factory=dict)
    table: TableEncoder | None = None  # raw records -> model inputs, for a mixed-type table's model
    folder: Path | None = None  # the local files it was loaded from

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def input_width(self) -> int:
        return self.table.width if self.table is not None else self.n_features

    # -- input -------------------------------------------------------------------------
    def rows_from_instances(self, instances: Sequence[Sequence[float]]) -> np.ndarray:
        """A float32 matrix from positional rows; each row must have one value per feature."""
        if len(instances) == 0:
            raise InvalidInput("instances: must hold at least one row, got []")
        if self.table is not None:
            raise InvalidInput(f"instances: this model takes named records with its raw columns "
                               f"({', '.join(self.feature_names[:5])}{', ...' if self.n_features > 5 else ''}); send records")
        for i, row in enumerate(instances):
            if len(row) != self.n_features:
                raise InvalidInput(f"instances.{i}: the model expects {self.n_features} values "
                                   f"({', '.join(self.feature_names[:5])}{', ...' if self.n_features > 5 else ''}), got {len(row)}")
        return self._finite(np.asarray(instances, dtype=np.float32), "instances")

    def rows_from_array(self, x: np.ndarray, key: str) -> np.ndarray:
        """A float32 matrix [n, n_features] from numeric tensors (the Open Inference Protocol)."""
        if self.table is not None:
            raise InvalidInput(f"{key}: this model takes its raw columns as named tensors")
        return self._finite(np.asarray(x, dtype=np.float32), key)

    def rows_from_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """A float32 matrix from named rows, in the model's feature order."""
        if len(records) == 0:
            raise InvalidInput("records: must hold at least one row, got []")
        if self.table is not None:
            return self.encode_records(records)
        expected = set(self.feature_names)
        for i, record in enumerate(records):
            if record.keys() != expected:
                missing = sorted(expected - record.keys())
                unknown = sorted(record.keys() - expected)
                parts = ([f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []) + (
                    [f"unknown {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"] if unknown else [])
                raise InvalidInput(f"records.{i}: feature names do not match the model: {'; '.join(parts)}")
        for i, record in enumerate(records):
            for name in self.feature_names:
                value = record[name]
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise InvalidInput(f"records.{i}: {name!r} must be a finite number, got {value!r}")
        matrix = np.array([[record[n] for n in self.feature_names] for record in records], dtype=np.float32)
        return self._finite(matrix, "records")

    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Raw records of a table model (null = missing, unseen category = its (other) slot)."""
        from models.tabular import TableError

        if self.table is None:
            raise ServingError(f"{self.resolved.uri}: not a table model, it has no raw-record encoding (use rows_from_records)")
        try:
            return self.table.encode_records(records)
        except TableError as e:
            raise InvalidInput(f"records.{e.row}: {e.column!r}: {e.message}") from None

    def _finite(self, x: np.ndarray, key: str) -> np.ndarray:
        if not np.isfinite(x).all():
            row, col = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
            raise InvalidInput(f"{key}.{row}: {self.feature_names[col]!r} must be a finite number, got {x[row, col]}")
        return x

    # -- output ------------------------------------------------------------------------
    def outputs(self, x: np.ndarray | EncodedRows) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(regression values, None) or (None, class probabilities): the forward pass as arrays.
        A table's rows not yet laid out as a matrix (batch scoring) go to the numpy program as they
        are, a block at a time; any other forward pass gets their matrix."""
        if not isinstance(x, np.ndarray):
            from models.numpy_net import NumpyNet

            if not isinstance(self.forward, NumpyNet):
                x = x.dense()
        out = np.asarray(self.forward(x))
        if self.task == "regression":
            return out[:, 0], None
        if self.task != "binary":
            return None, out
        probs = np.empty((len(out), 2), dtype=out.dtype)
        probs[:, 1] = out[:, 0]
        np.subtract(1.0, out[:, 0], out=probs[:, 0])
        return None, probs

    def predict_arrays(self, x: np.ndarray | EncodedRows) -> tuple[np.ndarray, np.ndarray | None]:
        """(predictions, class probabilities or None) as arrays: no Python lists."""
        values, probs = self.outputs(x)
        if probs is None:
            assert values is not None
            return values, None
        return self._labels[probs.argmax(axis=1)], probs

    @cached_property
    def classes(self) -> list[Any]:
        """The class of each probability column (indices if the model carries no labels)."""
        return self.class_labels or list(range(2 if self.task == "binary" else self.n_outputs))

    @cached_property
    def _labels(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)

    def predict(self, x: np.ndarray) -> dict[str, Any]:
        """Predictions for a validated matrix: labels and class probabilities, or values (JSON-ready)."""
        predictions, probs = self.predict_arrays(x)
        if probs is None:
            return {"predictions": predictions.tolist()}
        return {"predictions": predictions.tolist(), "probabilities": probs.round(6).tolist(), "classes": self.classes}


def load(uri: str, store: Store) -> LoadedModel:
    """Resolve, download and compile a model logged by the workbench (a Keras MLflow model)."""
    return fetch(store.resolve(uri), store)


def fetch(resolved: ResolvedModel, store: Store) -> LoadedModel:
    """Download and compile a model already pinned to a version. Downloaded files live as long as
    the model (batch scoring's local workers read them): a process that loads one version after
    another (the API following an alias, `--every`) leaves no folder per version behind."""
    local = Path(resolved.uri).is_dir()  # a model folder of the caller's, read where it is
    path = store.download(resolved)
    try:
        model = from_directory(path, resolved)
    except BaseException:
        if not local:
            discard(path)
        raise
    if not local:
        weakref.finalize(model, discard, path)
    return model


def from_directory(path: Path, resolved: ResolvedModel) -> LoadedModel:
    """Load a workbench model folder (its contract: models.contract): the numpy program when the
    model was exported as one (no TensorFlow needed), else the Keras network, compiled."""
    try:
        contract = ModelContract.read(path)
        compiled = _numpy(path / NUMPY_FILE) if contract.runtime == "numpy" else _keras(path, contract, resolved)
    except ContractError as e:
        raise ServingError(f"{resolved.uri}: {e}") from None
    info = {key.removeprefix("workbench."): value for key, value in resolved.tags.items() if key.startswith("workbench.")}
    return LoadedModel(resolved, contract.task, contract.feature_names, contract.class_labels, compiled.forward,
                       n_outputs=compiled.n_outputs, info={**info, "runtime": compiled.kind}, table=contract.table,
                       folder=path)


def _numpy(file: Path) -> CompiledForward:
    from models.numpy_net import NetError, NumpyNet

    try:
        return CompiledForward.numpy(NumpyNet.load(file))
    except NetError as e:
        raise ContractError(str(e)) from None


def _keras(path: Path, contract: ModelContract, resolved: ResolvedModel) -> CompiledForward:
    try:
        import keras
    except ImportError:
        raise ServingError(
            f"{resolved.uri}: this model needs TensorFlow (its network has layers beyond the dense ones "
            "that numpy runs, or it was logged before models were exported for numpy), and this server "
            "has none: serve it with the serving-tf image (docker build --target serving-tf) or "
            "pip install '.[serve,tf]'") from None

    import models.layers  # noqa: F401  (registers the workbench's own layers before loading)
    from models.inference import compile_forward

    model = keras.saving.load_model(ModelContract.network_file(path), compile=False)
    table = contract.table
    return compile_forward(model, table.width if table is not None else len(contract.feature_names))
