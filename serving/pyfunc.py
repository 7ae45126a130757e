"""The MLflow pyfunc of a mixed-type table's model: raw records in, labels and probabilities out.

`mlflow.pyfunc.load_model(uri).predict(raw_dataframe)` and `mlflow models serve` (in an
environment with this package installed) answer through the same loader, encoding and forward
pass as the API and batch scoring (serving.model), so every server gives the same answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel


class TableModel(PythonModel):
    """Artifacts: `model.keras` (the network) and `table.json` (the encoding: models.tabular)."""

    # The signature is explicit (raw columns) and the encoding validates each value itself: no
    # type-hint wrapping of predict (which would also warn, past any warning filter, on every save).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from serving.model import from_directory
        from serving.store import ResolvedModel

        root = Path(context.artifacts["table"]).parents[1]
        self._model = from_directory(root, ResolvedModel(str(root), None, None, None, None))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        table = self._model.table
        assert table is not None  # saved only for a table model, whose MLmodel names the table format
        predictions, probs = self._model.predict_arrays(table.encode(frame))
        out = pd.DataFrame({"prediction": predictions})
        if probs is not None:
            for j, label in enumerate(self._model.classes):
                out[f"probability_{label}"] = probs[:, j]
        return out
