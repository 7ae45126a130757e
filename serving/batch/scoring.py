"""One chunk of raw rows -> its predictions and its invalid rows (pure: no I/O).

Rows that cannot be scored (a missing or non-numeric value, NaN/inf, a value a table model's
encoding refuses) are never dropped silently: they come back with their identity and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from serving.batch.sinks import MODEL_NAME, MODEL_VERSION, SCORED_AT

if TYPE_CHECKING:
    import pandas as pd

    from models.tabular import EncodedRows
    from serving.model import LoadedModel


@dataclass(frozen=True)
class Identity:
    """What names a row in the output and the errors: its key, else its row number (within its part,
    with the part's name when the input has several)."""

    key: str | None
    part: str | None
    carry: tuple[str, ...]  # input columns copied to the output (the key, the since column, --keep)

    def columns(self) -> list[str]:
        if self.key is not None:
            return []
        return [*(["part"] if self.part is not None else []), "row"]


@dataclass(frozen=True)
class Inputs:
    """A chunk made ready for the model: its rows as float32 features (a table model's as its
    encoded columns, which the forward pass lays out a block of rows at a time), which rows are
    valid, and why each of the others is not (in row order)."""

    features: np.ndarray | EncodedRows
    ok: np.ndarray
    reasons: list[str]


def model_inputs(model: LoadedModel, chunk: pd.DataFrame) -> Inputs:
    """Validate and encode a chunk of raw rows (a table model's encoding, or numeric columns)."""
    if model.table is not None:  # its matrix is laid out a block at a time by the forward pass
        features, wrong = model.table.encoded(chunk)
        ok = np.ones(len(chunk), dtype=bool)
        ok[list(wrong)] = False
        return Inputs(features, ok, [f"{column!r}: {message}" for _, (column, message) in sorted(wrong.items())])
    return _numeric_inputs(model, chunk)


def _numeric_inputs(model: LoadedModel, chunk: pd.DataFrame) -> Inputs:
    """The inputs of a model without a table encoding: its feature columns as numbers."""
    import pandas as pd

    frame = chunk[model.feature_names]
    text = [c for c, t in frame.dtypes.items() if not (pd.api.types.is_float_dtype(t) or pd.api.types.is_integer_dtype(t))]
    if text:  # a column with a stray word (or booleans): its numbers still count, the rest are reported
        frame = frame.assign(**{c: pd.to_numeric(frame[c].where(~frame[c].map(lambda v: isinstance(v, bool))), errors="coerce")
                                for c in text})
    features = frame.to_numpy(dtype=np.float32, na_value=np.nan)
    ok = np.isfinite(features).all(axis=1)
    reasons = [_reason(model.feature_names, r) for r in frame.loc[~ok].itertuples(index=False)] if not ok.all() else []
    return Inputs(features, ok, reasons)


def score_chunk(model: LoadedModel, chunk: pd.DataFrame, inputs: Inputs, identity: Identity, *, part: str,
                first_row: int, stamp: pd.Timestamp) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(predictions, invalid rows) of one chunk and its `model_inputs`; either may be None when it has no rows."""
    features, ok, reasons = inputs.features, inputs.ok, inputs.reasons
    rows = np.arange(first_row, first_row + len(chunk))
    errors = None
    if not ok.all():
        bad = _identity(identity, chunk, ~ok, rows, part)
        bad["reason"] = reasons
        errors = _frame(bad, model, int((~ok).sum()), stamp)
    if not ok.any():
        return None, errors
    every = ok.all()  # the common case: no row copied for a mask
    columns = _identity(identity, chunk, None if every else ok, rows, part)
    columns.update({col: chunk[col].to_numpy() if every else chunk[col].to_numpy()[ok] for col in identity.carry})
    return _predictions(model, features if every else features[ok], columns, stamp), errors


def sample_output(model: LoadedModel, chunk: pd.DataFrame, identity: Identity) -> pd.DataFrame:
    """One output row with the output's columns and types (for creating a table before scoring)."""
    import pandas as pd

    head = chunk.head(1)
    columns = _identity(identity, head, None, np.zeros(len(head), dtype=np.int64), "")
    columns.update({col: head[col].to_numpy() for col in identity.carry})
    features = np.zeros((len(head), model.input_width), dtype=np.float32)
    return _predictions(model, features, columns, pd.Timestamp.now(tz="UTC"))


def _predictions(model: LoadedModel, features: np.ndarray | EncodedRows, columns: dict, stamp: pd.Timestamp) -> pd.DataFrame:
    import pandas as pd

    values, probs = model.outputs(features)
    if probs is None:
        columns["prediction"] = values
    else:
        # Labels as a categorical: one small dictionary instead of a string per row (Parquet and
        # pandas both keep it as such).
        columns["prediction"] = pd.Categorical.from_codes(probs.argmax(axis=1), categories=model.classes)
        for j, label in enumerate(model.classes):
            columns[f"probability_{label}"] = probs[:, j].astype(np.float32, copy=False)
    return _frame(columns, model, len(features), stamp)


def _frame(columns: dict, model: LoadedModel, n: int, stamp: pd.Timestamp) -> pd.DataFrame:
    """The columns, with the model's name and version and the scoring time on every row (one
    category each: cheap), as one frame built at once."""
    import pandas as pd

    r = model.resolved
    zeros = np.zeros(n, dtype=np.int8)
    columns[MODEL_NAME] = pd.Categorical.from_codes(zeros, categories=[str(r.name or r.uri)])
    columns[MODEL_VERSION] = pd.Categorical.from_codes(zeros, categories=[str(r.version or "")])
    columns[SCORED_AT] = pd.DatetimeIndex(np.full(n, stamp.as_unit("us").tz_convert(None).asm8), tz="UTC")
    return pd.DataFrame(columns, copy=False)


def _identity(identity: Identity, chunk: pd.DataFrame, mask: np.ndarray | None, rows: np.ndarray, part: str) -> dict:
    """The identity columns of the rows in `mask` (None: every row)."""
    if identity.key is not None:
        keys = chunk[identity.key].to_numpy()
        return {identity.key: keys if mask is None else keys[mask]}
    out: dict = {}
    picked = rows if mask is None else rows[mask]
    if identity.part is not None:
        import pandas as pd

        out["part"] = pd.Categorical.from_codes(np.zeros(len(picked), dtype=np.int8), categories=[part])
    out["row"] = picked
    return out


def _reason(names: Sequence[str], values) -> str:
    for name, raw in zip(names, values, strict=True):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return f"{name!r} is not a number: {raw!r}"
        if not math.isfinite(value):
            return f"{name!r} must be a finite number, got {raw!r}"
    return "invalid row"
