"""The saved-model format: a trained Keras model as an MLflow model folder carrying its contract
(models.contract). All-numeric data: the Keras flavor; a mixed-type table: a pyfunc taking raw
records (serving.pyfunc.TableModel)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.contract import NUMPY_FILE, ModelContract
from studies.tracking.names import STUDY_TAG

if TYPE_CHECKING:
    import keras

    from models import DataSpec

log = logging.getLogger(__name__)


# The distributions a logged model pins, and the module each provides.
_PINNED = {"tensorflow-cpu": "tensorflow", "tensorflow": "tensorflow", "keras": "keras", "numpy": "numpy", "mlflow": "mlflow"}


@functools.cache
def pip_requirements() -> tuple[str, ...]:
    """Pinned requirements of a logged model, given explicitly (inferring them costs ~12 s a model)."""
    from importlib import metadata

    reqs = []
    for dist in _PINNED:
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return tuple(reqs)


def prime_requirement_checks() -> None:
    """Saving a model, MLflow checks its requirements against this environment, and first maps
    every installed distribution to its modules (importlib.metadata.packages_distributions: ~5 s
    of CPU over this project's ~250 distributions, once per process). That map is only its
    fallback for a requirement whose version the distribution's metadata does not give; ours are
    pinned from that metadata (pip_requirements), so MLflow is handed the map of those alone."""
    from mlflow.utils import requirements_utils

    if requirements_utils._MODULES_TO_PACKAGES is None:
        own: dict[str, list[str]] = {}
        for requirement in pip_requirements():
            dist = requirement.partition("==")[0]
            own.setdefault(_PINNED[dist], []).append(dist)
        requirements_utils._MODULES_TO_PACKAGES = own  # type: ignore[assignment]  # declared as None there


def save_model(model: keras.Model, spec: DataSpec, tags: dict[str, str]) -> Path:
    """Save the Keras model as an MLflow model carrying its contract (models.contract) into a temp dir:
    the Keras flavor for all-numeric data, a pyfunc taking raw records for a mixed-type table; a
    dense network is also exported as numpy steps (runtime numpy: served without TensorFlow)."""
    from models.export import export_checked

    prime_requirement_checks()
    export = export_checked(model)
    if export.net is None:
        log.info("model kept for TensorFlow serving only: %s", export.reason)
    contract = dataclasses.replace(ModelContract.from_spec(spec), runtime="numpy" if export.net is not None else "tensorflow")
    metadata = contract.metadata(study=tags.get(STUDY_TAG), trial_number=tags.get("optuna.trial_number"))
    path = Path(tempfile.mkdtemp(prefix="workbench-model-")) / "model"
    if contract.table is not None:
        _save_table_model(model, contract, metadata, path)
    else:
        _save_keras_model(model, spec, metadata, path)
    if export.net is not None:
        export.net.save(path / NUMPY_FILE)
    return path


def _save_keras_model(model: keras.Model, spec: DataSpec, metadata: dict[str, Any], path: Path) -> None:
    import mlflow.keras
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    outputs = 1 if spec.task != "multiclass" else spec.n_classes
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, spec.n_features), "features")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, outputs))]),
    )
    mlflow.keras.save_model(model, str(path), signature=signature, pip_requirements=list(pip_requirements()), metadata=metadata)


def _save_table_model(model: keras.Model, contract: ModelContract, metadata: dict[str, Any], path: Path) -> None:
    """A mixed-type table's model: an MLflow pyfunc (serving.pyfunc.TableModel) holding the network
    and its encoding, with the raw columns as its signature."""
    import mlflow.pyfunc
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    from serving.pyfunc import TableModel

    parts = path.parent / "parts"
    parts.mkdir()
    model.save(parts / "model.keras")
    table = contract.write_table(parts)
    assert contract.table is not None  # only called for a table model's contract (save_model)
    signature = ModelSignature(inputs=Schema([ColSpec(AnyType() if c.raw_type == "any" else c.raw_type, c.name, required=False)
                                              for c in contract.table.columns]))
    mlflow.pyfunc.save_model(str(path), python_model=TableModel(), signature=signature, metadata=metadata,
                             artifacts={"keras_model": str(parts / "model.keras"), "table": str(table)},
                             pip_requirements=list(pip_requirements()))
