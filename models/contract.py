"""What a registered model carries, defined once: tracking writes it, serving reads it.

A workbench model folder is an MLflow model whose MLmodel `metadata` holds the task, the columns
a request names (`feature_names`), the class labels, and for a mixed-type table's model the
`format` marker, with the fitted encoding in `artifacts/table.json` (models.tabular). The Keras
network is `data/model.keras` (Keras flavor, all-numeric data) or `artifacts/model.keras` (the
table pyfunc). `runtime` says what serving needs: `numpy` when the network is also exported as
`network.npz` (models.numpy_net: a dense network, runnable without TensorFlow), else `tensorflow`
(the default of models logged before the export existed). Nothing here knows MLflow's API: only
the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import WorkbenchError

if TYPE_CHECKING:
    from models.datasets import DataSpec
    from models.tabular import TableEncoder

TABLE_FORMAT = "workbench-table"
TABLE_FILE = "table.json"
NETWORK_FILES = ("data/model.keras", "artifacts/model.keras")
NUMPY_FILE = "network.npz"
RUNTIMES = ("numpy", "tensorflow")


class ContractError(WorkbenchError, ValueError):
    """A folder that is not a workbench model."""


@dataclass(frozen=True)
class ModelContract:
    task: str
    feature_names: list[str]  # the columns (or positional features) a request names, in order
    class_labels: list[Any] | None
    table: TableEncoder | None = None
    runtime: str = "tensorflow"  # what serving needs to run the network (RUNTIMES)

    @classmethod
    def from_spec(cls, spec: DataSpec) -> ModelContract:
        labels = None if spec.class_labels is None else [v.item() if hasattr(v, "item") else v for v in spec.class_labels]
        names = spec.table.feature_names if spec.table is not None else list(spec.feature_names)
        return cls(spec.task, names, labels, spec.table)

    def metadata(self, **extra: Any) -> dict[str, Any]:
        """The MLmodel metadata of this contract (plus provenance such as study and trial)."""
        meta = {"task": self.task, "feature_names": self.feature_names, "class_labels": self.class_labels,
                "runtime": self.runtime, **extra}
        if self.table is not None:
            meta.update(format=TABLE_FORMAT, id_columns=list(self.table.ids))
        return meta

    def write_table(self, folder: Path) -> Path:
        if self.table is None:
            raise ContractError("not a table model: there is no table encoding to write")
        path = folder / TABLE_FILE
        path.write_text(json.dumps(self.table.to_dict()))
        return path

    @classmethod
    def read(cls, folder: Path) -> ModelContract:
        """The contract of a model folder (MLmodel metadata, and table.json for a table model)."""
        import yaml

        mlmodel = folder / "MLmodel"
        if not mlmodel.is_file():
            raise ContractError(f"no MLmodel file in {folder}")
        meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
        if "feature_names" not in meta or "task" not in meta:
            raise ContractError("not a workbench model (its MLmodel metadata lacks feature_names/task)")
        table = None
        if meta.get("format") == TABLE_FORMAT:
            from models.tabular import TableEncoder

            table = TableEncoder.from_dict(json.loads((folder / "artifacts" / TABLE_FILE).read_text()))
        runtime = meta.get("runtime", "tensorflow")
        if runtime not in RUNTIMES:
            raise ContractError(f"runtime {runtime!r} in its MLmodel metadata: this server knows {', '.join(RUNTIMES)}")
        if runtime == "numpy" and not (folder / NUMPY_FILE).is_file():
            raise ContractError(f"its MLmodel says runtime numpy but there is no {NUMPY_FILE} in {folder}")
        return cls(meta["task"], list(meta["feature_names"]), meta.get("class_labels"), table, runtime)

    @staticmethod
    def network_file(folder: Path) -> Path:
        """The Keras network inside a model folder."""
        for name in NETWORK_FILES:
            if (folder / name).is_file():
                return folder / name
        raise ContractError(f"no Keras network ({' or '.join(NETWORK_FILES)}) in {folder}")
