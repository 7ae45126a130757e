"""The MLflow pyfunc of a mixed-type table's model: raw records in, labels and probabilities out.

`mlflow.pyfunc.load_model(uri).predict(raw_dataframe)` and `mlflow models serve` (in an
environment with this package installed) answer through the same loader, encoding and forward
pass as the API and batch scoring (serving.model), so every server gives the same answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc


class TableModel(mlflow.pyfunc.PythonModel):
    """Artifacts: `model.keras` (the network) and `table.json` (the encoding: models.tabular)."""

    def load_context(self, context) -> None:
        from serving.model import from_directory
        from serving.registry import ResolvedModel

        root = Path(context.artifacts["table"]).parents[1]
        self._model = from_directory(root, ResolvedModel(str(root), None, None, None, None))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        predictions, probs = self._model.predict_arrays(self._model.table.encode(frame))
        out = pd.DataFrame({"prediction": predictions})
        for j, label in enumerate(self._model.classes if probs is not None else []):
            out[f"probability_{label}"] = probs[:, j]
        return out
