"""Mixed-type tables: column kinds, and the preprocessing that travels inside a registered model.

`TableEncoder` is fitted on the training split only and turns raw records (numbers, strings,
booleans, missing values) into the float matrix the network takes:
- numeric: missing values filled with the training mean, standardised, plus a `<name>__missing`
  indicator when the training split had missing values in that column;
- boolean: 0/1 (true/false, yes/no, y/n, t/f, 1/0 in any case), missing filled with the training
  rate, plus an indicator like numeric;
- categorical: one-hot over the training vocabulary, with a `(missing)` slot and an `(other)` slot
  that takes levels seen fewer than `rare_count(rows)` times in training and any level never seen.
Its `to_dict()` is the contract a registered model carries (`table.json`); serving rebuilds it with
`from_dict()`, so training and serving share one encoding. Nothing here knows Keras or MLflow.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import numpy as np

from models.errors import WorkbenchError

KINDS = ("numeric", "categorical", "boolean", "drop", "id")
MISSING, OTHER = "(missing)", "(other)"
RARE_COUNT = 5  # a level seen fewer times in the training split folds into (other) (see rare_count)
MAX_LEVELS = 1000  # the most frequent levels kept per column; the rest fold into (other)
ID_MIN_ROWS = 20  # a string column whose values are all distinct over at least this many rows looks like an id
_TRUE = frozenset({"true", "yes", "y", "t", "1"})
_FALSE = frozenset({"false", "no", "n", "f", "0"})


class TableError(WorkbenchError, ValueError):
    """A column that cannot be used as asked; `column` names it."""

    def __init__(self, column: str, message: str, row: int | None = None) -> None:
        super().__init__(f"{column!r}: {message}" if row is None else f"row {row}: {column!r}: {message}")
        self.column, self.message, self.row = column, message, row


@dataclass(frozen=True)
class Column:
    """One raw feature column and what its encoding learned from the training split."""

    name: str
    kind: str  # numeric | boolean | categorical
    missing_rate: float = 0.0
    mean: float = 0.0  # numeric: fill value and centre; boolean: fill value (the rate of true)
    std: float = 1.0
    indicator: bool = False
    levels: tuple[str, ...] = ()  # categorical vocabulary, most frequent first
    raw_type: str = "any"  # what its raw values were in training: double, boolean, string or any (mixed)
    median: float = 0.0  # numeric: for robust scaling (a searchable choice the network applies)
    iqr: float = 1.0

    @property
    def n_outputs(self) -> int:
        """How many encoded columns this column produces."""
        return len(self.levels) + 2 if self.kind == "categorical" else 1 + self.indicator

    @property
    def outputs(self) -> list[str]:
        """Names of the encoded columns this column produces."""
        if self.kind == "categorical":
            return [f"{self.name}={level}" for level in (MISSING, OTHER, *self.levels)]
        return [self.name, *([f"{self.name}__missing"] if self.indicator else [])]


@dataclass(frozen=True, eq=False)
class EncodedRows:
    """Rows of a table encoded column by column, not yet one matrix: each numeric or boolean
    output column's values, and each categorical column's one-hot slot per row (an output column).
    `dense()` lays them out as `TableEncoder.encode_rows` does; `fill` writes a block of them into
    a zeroed buffer, so a forward pass over many rows (models.numpy_net) reads a buffer that stays
    in cache instead of a matrix of rows x width floats: a chunk of 100,000 rows of a table with
    1,394 model inputs is 557 MB, whose first writes cost a fresh allocation's page faults (and,
    where numpy asks for huge pages, compaction stalls of up to a second; benchmarks/RESULTS.md)."""

    width: int
    n: int
    values: tuple[tuple[int, np.ndarray], ...]  # (output column, float32 per row)
    hot: tuple[np.ndarray, ...]  # per categorical column: the output column set to 1, per row

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: Any) -> EncodedRows:
        """The rows a boolean mask, index array or slice selects, as a matrix's rows would be."""
        at = np.arange(self.n)[rows]
        return EncodedRows(self.width, len(at), tuple((j, v[at]) for j, v in self.values), tuple(h[at] for h in self.hot))

    def fill(self, out: np.ndarray, start: int) -> None:
        """Write rows start .. start + len(out) into `out`, which is zero but where `clear` left it."""
        stop = start + len(out)
        for j, v in self.values:
            out[:, j] = v[start:stop]
        at = np.arange(len(out))
        for h in self.hot:
            out[at, h[start:stop]] = 1.0

    def clear(self, out: np.ndarray, start: int) -> None:
        """Zero what `fill` wrote of rows start .. (the value columns are written over anyway)."""
        at = np.arange(len(out))
        for h in self.hot:
            out[at, h[start:start + len(out)]] = 0.0

    def dense(self) -> np.ndarray:
        out = np.zeros((self.n, self.width), dtype=np.float32)
        self.fill(out, 0)
        return out


@dataclass(frozen=True)
class TableEncoder:
    columns: tuple[Column, ...]
    ids: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    _slots: dict[str, dict[str, int]] = field(default_factory=dict, compare=False, repr=False)
    _index: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # pandas Index (arrow array) per categorical
    _offsets: list[int] = field(default_factory=list, compare=False, repr=False)  # first encoded column of each, then the width
    _features: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    _allowed: frozenset[str] = field(default=frozenset(), compare=False, repr=False)  # features and ids

    def __post_init__(self) -> None:
        offset = 0
        for col in self.columns:
            if col.kind == "categorical":
                self._slots[col.name] = {level: i + 2 for i, level in enumerate(col.levels)}
            self._offsets.append(offset)
            offset += col.n_outputs
        self._offsets.append(offset)
        object.__setattr__(self, "_features", frozenset(c.name for c in self.columns))
        object.__setattr__(self, "_allowed", self._features | set(self.ids))

    # -- what it is ---------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        """The raw feature columns a record must carry, in order."""
        return [c.name for c in self.columns]

    @property
    def encoded_names(self) -> list[str]:
        return [name for c in self.columns for name in c.outputs]

    @property
    def width(self) -> int:
        return self._offsets[-1]

    def describe(self) -> list[str]:
        """A short table: column, kind, missing %, levels (printed once when a study starts)."""
        lines = [f"{'column':<24}{'kind':<13}{'missing':>8}  levels"]
        for c in self.columns:
            levels = f"{len(c.levels)} + (missing), (other)" if c.kind == "categorical" else ""
            lines.append(f"{c.name[:23]:<24}{c.kind:<13}{100 * c.missing_rate:>7.1f}%  {levels}")
        lines += [f"{name[:23]:<24}{'id':<13}{'':>8}  (not a feature; carried through batch scoring)" for name in self.ids]
        lines += [f"{name[:23]:<24}{'drop':<13}" for name in self.dropped]
        return lines

    def typical_record(self) -> dict[str, Any]:
        """A raw record of typical values (each numeric column's mean, each boolean's majority,
        each categorical's most frequent level): what a latency probe sends (serving.probe)."""
        def typical(c: Column) -> Any:
            if c.kind == "categorical":
                return c.levels[0] if c.levels else None
            return bool(c.mean >= 0.5) if c.kind == "boolean" else float(c.mean)

        return {c.name: typical(c) for c in self.columns}

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, "columns": [{**asdict(c), "levels": list(c.levels)} for c in self.columns],
                "ids": list(self.ids), "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableEncoder:
        columns = tuple(Column(**{**c, "levels": tuple(c.get("levels") or ())}) for c in data["columns"])
        return cls(columns, tuple(data.get("ids") or ()), tuple(data.get("dropped") or ()))

    # -- fitting ------------------------------------------------------------------------
    @classmethod
    def fit(cls, frame, kinds: Mapping[str, str]) -> TableEncoder:
        """Learn the encoding of every feature column (kind numeric/boolean/categorical) from the
        training rows in `frame`; `kinds` also names id and drop columns."""
        import pandas as pd

        columns = []
        for name, kind in kinds.items():
            if kind not in ("numeric", "boolean", "categorical"):
                continue
            series = frame[name]
            missing = series.isna().to_numpy()
            rate = float(missing.mean()) if len(series) else 0.0
            raw = _raw_type(series[~missing], kind)
            if kind == "categorical":
                present = series[~missing]
                if isinstance(present.dtype, pd.CategoricalDtype) or not pd.api.types.is_string_dtype(present):
                    present = pd.Series(_strings(present), dtype=object)
                counts = present.value_counts(sort=False)  # hashed, not sorted strings
                rare = rare_count(len(frame))
                ranked = sorted((-int(n), str(v)) for v, n in counts.items() if n >= rare)
                columns.append(Column(name, kind, rate, levels=tuple(v for _, v in ranked[:MAX_LEVELS]), raw_type=raw))
                continue
            values = _numbers(series) if kind == "numeric" else _booleans(series)
            seen = values[~np.isnan(values)]
            mean = float(seen.mean()) if seen.size else 0.0
            std = float(seen.std()) if kind == "numeric" and seen.size else 1.0
            std = std if std > 1e-12 else 1.0
            q1, median, q3 = (float(v) for v in np.percentile(seen, [25, 50, 75])) if seen.size else (0.0, mean, 1.0)
            columns.append(Column(name, kind, rate, mean, std, indicator=bool(missing.any()), raw_type=raw,
                                  median=median, iqr=q3 - q1 if q3 - q1 > 1e-12 else std))
        ids = tuple(n for n, k in kinds.items() if k == "id")
        dropped = tuple(n for n, k in kinds.items() if k == "drop")
        return cls(tuple(columns), ids, dropped)

    # -- encoding -----------------------------------------------------------------------
    def encode(self, frame) -> np.ndarray:
        """The float32 matrix of `frame`'s rows; a value of the wrong type raises TableError."""
        matrix, bad = self.encode_rows(frame)
        if bad:
            row, (column, message) = next(iter(bad.items()))
            raise TableError(column, message, row)
        return matrix

    def encode_rows(self, frame) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
        """The matrix, and for each row (position) that cannot be encoded the first column at
        fault and why (its value there taken as missing)."""
        rows, bad = self.encoded(frame)
        return rows.dense(), bad

    def encoded(self, frame) -> tuple[EncodedRows, dict[int, tuple[str, str]]]:
        """`encode_rows` without laying the rows out as one matrix: each column's values and
        one-hot slots, for a forward pass that fills a block of rows at a time (models.numpy_net)."""
        n = len(frame)
        values: list[tuple[int, np.ndarray]] = []
        hot: list[np.ndarray] = []
        bad: dict[int, tuple[str, str]] = {}
        j = 0
        for c in self.columns:
            series = frame[c.name]
            if c.kind == "categorical":
                hot.append((j + self._codes(c, series)).astype(np.int32, copy=False))
            else:
                raw_missing = series.isna().to_numpy()
                column = (_numbers if c.kind == "numeric" else _booleans)(series)
                wrong = ~np.isfinite(column) & ~raw_missing  # not a number, or inf (a database's -Infinity)
                for row in np.flatnonzero(wrong):
                    bad.setdefault(int(row), (c.name, f"must be {_WANT[c.kind]}, got {series.iloc[row]!r}"))
                missing = np.isnan(column)
                filled = np.where(missing, c.mean, column)
                values.append((j, ((filled - c.mean) / c.std if c.kind == "numeric" else filled).astype(np.float32)))
                if c.indicator:
                    values.append((j + 1, missing.astype(np.float32)))
            j += c.n_outputs
        return EncodedRows(self.width, n, tuple(values), tuple(hot)), bad

    def _codes(self, c: Column, series) -> np.ndarray:
        """Slot of each value: 0 (missing), 1 (other: rare or unseen), 2.. the training levels."""
        import pandas as pd

        missing = series.isna().to_numpy()
        if isinstance(series.array, pd.arrays.ArrowStringArray):  # strings arrow holds: looked up there
            found = self._arrow_found(c, series.array)
        else:
            index = self._index.get(c.name)
            if index is None:
                index = self._index[c.name] = pd.Index(list(c.levels), dtype=object)
            if isinstance(series.dtype, pd.CategoricalDtype):
                series = series.astype(object)
            if not pd.api.types.is_string_dtype(series):  # numbers or mixed values: 3, 3.0 and "3" are one level
                series = pd.Series(_strings(series.where(~missing, "")), index=series.index, dtype=object)
            found = index.get_indexer(np.asarray(series, dtype=object))  # hashed lookup, -1 when unseen
        codes = np.where(found >= 0, found + 2, 1)
        codes[missing] = 0
        return codes

    def _arrow_found(self, c: Column, array: Any) -> np.ndarray:
        """Each value's position among the column's levels, -1 when not among them (or null), by
        arrow's hashed lookup: no Python string per row (a 100,000-row column of 1,000 levels in
        2 ms against 28 ms through a pandas Index of Python strings; the same positions)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        values = pa.array(array)
        key = f"{c.name}\0{values.type}"
        levels = self._index.get(key)
        if levels is None:
            levels = self._index[key] = pa.array(list(c.levels), type=values.type)
        return pc.fill_null(pc.index_in(values, value_set=levels), -1).to_numpy()

    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """JSON records straight to the matrix, without pandas (the API's single-row path); the
        same values as `encode(frame_from_records(records))`, TableError naming row and column."""
        out = np.zeros((len(records), self.width), dtype=np.float32)
        for i, record in enumerate(records):
            self._check_columns(record, i)
            j = 0
            for c in self.columns:
                value = record[c.name]
                if c.kind == "categorical":
                    missing = value is None or isinstance(value, float) and math.isnan(value)
                    out[i, j + (0 if missing else self._slots[c.name].get(_level(value), 1))] = 1.0
                else:
                    number = _number(value) if c.kind == "numeric" else _boolean(value)
                    if number is _WRONG:
                        raise TableError(c.name, f"must be {_WANT[c.kind]}, got {value!r}", i)
                    if number is None:
                        out[i, j] = 0.0 if c.kind == "numeric" else c.mean
                        if c.indicator:
                            out[i, j + 1] = 1.0
                    else:
                        out[i, j] = (number - c.mean) / c.std if c.kind == "numeric" else number
                j += c.n_outputs
        return out

    def _check_columns(self, record: Mapping[str, Any], row: int) -> None:
        """Every feature column present, nothing but features and ids; else TableError naming one."""
        if self._features.issubset(record) and self._allowed.issuperset(record):
            return
        missing = [n for n in self.feature_names if n not in record]
        if missing:
            raise TableError(missing[0], f"required column is missing (columns: {_names(self.feature_names)})", row)
        unknown = sorted(set(record) - self._allowed)
        raise TableError(unknown[0], f"not a column of the model (columns: {_names(self.feature_names)})", row)

    def frame_from_records(self, records: Sequence[Mapping[str, Any]]):
        """A DataFrame of JSON records (null = missing); a missing or unknown column raises TableError."""
        import pandas as pd

        for i, record in enumerate(records):
            self._check_columns(record, i)
        return pd.DataFrame({n: pd.Series([r[n] for r in records], dtype=object) for n in self.feature_names})


def rare_count(rows: int) -> int:
    """Fewer training occurrences than this fold a level into (other): RARE_COUNT, lowered for small
    training splits (1% of the rows, at least 2) so a small table keeps its categories."""
    return min(RARE_COUNT, max(2, rows // 100))


def infer_kinds(frame, target: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each column's kind (target excluded), overrides applied; raises TableError for a column that
    cannot be used: entirely missing, an override that cannot hold, or a likely identifier."""
    import pandas as pd

    overrides = dict(overrides or {})
    kinds: dict[str, str] = {}
    for name in frame.columns:
        if name == target:
            continue
        series = frame[name]
        kind = overrides.get(name)
        if kind in ("drop", "id"):
            kinds[name] = kind
            continue
        present = series.dropna()
        if present.empty:
            raise TableError(name, f"must hold at least one value (or drop it: columns: {{{name}: drop}}), "
                                   f"got {len(series)} missing values")
        guessed = _guess(series, present)
        if kind is None:
            if guessed == "categorical" and len(present) >= ID_MIN_ROWS and present.nunique() == len(present) \
                    and not pd.api.types.is_numeric_dtype(series):
                raise TableError(name, f"looks like an identifier: mark it id (columns: {{{name}: id}}) or drop it, "
                                       f"got {len(present)} distinct values in {len(present)} rows, e.g. {present.iloc[0]!r}")
            kind = guessed
        elif kind == "numeric" and guessed not in ("numeric",) and not pd.api.types.is_bool_dtype(series):
            bad = _numbers(series)
            example = present.iloc[int(np.flatnonzero(np.isnan(bad[series.notna().to_numpy()]))[0])]
            raise TableError(name, f"must hold numbers to be numeric, got {example!r}")
        elif kind == "boolean" and guessed != "boolean":
            raise TableError(name, f"must hold true/false or yes/no values to be boolean, got {present.iloc[0]!r}")
        kinds[name] = kind
    return kinds


def _guess(series, present) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if isinstance(series.dtype, pd.CategoricalDtype):  # declared categorical, even with numeric codes
        return "categorical"
    if pd.api.types.is_numeric_dtype(series):
        return "numeric"
    uniques = present.unique()
    tokens = {str(v).strip().lower() for v in uniques[:8]}
    if len(uniques) <= 8 and tokens and all(t in _TRUE or t in _FALSE for t in tokens) and not tokens <= {"0", "1"}:
        return "boolean"  # yes/no, True/False, Y/N in any case; 0/1 stays numeric
    sample = present.iloc[:1000]  # most text columns show a word in their first rows
    if np.isfinite(_numbers(sample)).all() and np.isfinite(_numbers(present)).all():
        return "numeric"
    return "categorical"


def _raw_type(present, kind: str) -> str:
    """The type a client sends for this column (the model signature's): numbers for numeric columns;
    booleans or strings as they were in training; `any` when the training values were mixed."""
    import pandas as pd

    if kind == "numeric":
        return "double"
    if pd.api.types.is_bool_dtype(present):
        return "boolean"
    return "string" if all(isinstance(v, str) for v in present.tolist()) else "any"


class _Wrong(enum.Enum):
    WRONG = "wrong"  # a value that does not fit its column


_WRONG: Final = _Wrong.WRONG
_WANT = {"numeric": "a number", "boolean": "a boolean (true/false, yes/no)"}  # what a column's values must be


def _level(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _number(value: Any) -> float | None | Literal[_Wrong.WRONG]:
    if value is None:
        return None
    if isinstance(value, bool):
        return _WRONG
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _WRONG
    return None if math.isnan(number) else number


def _boolean(value: Any) -> float | None | Literal[_Wrong.WRONG]:
    if value is None or isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    token = _level(value).strip().lower()
    return 1.0 if token in _TRUE else 0.0 if token in _FALSE else _WRONG


def _strings(series) -> list[str]:
    """Category values as strings: 3, 3.0 and "3" are the same level."""
    out = []
    for v in series.tolist():
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(str(v))
    return out


def _numbers(series) -> np.ndarray:
    """Numbers of a column: NaN where missing or not a number (a bool column gives 0/1; a stray true in text does not)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return series.astype("float64").to_numpy()
    values = pd.to_numeric(series.map(lambda v: v if not isinstance(v, bool) else math.nan), errors="coerce") \
        if series.dtype == object else pd.to_numeric(series, errors="coerce")
    return np.asarray(values, dtype=np.float64)


def _booleans(series) -> np.ndarray:
    """0/1 of a column (NaN where missing or not a boolean token)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return series.astype("float64").to_numpy()
    tokens = {v: (1.0 if v in _TRUE else 0.0) for v in _TRUE | _FALSE}
    present = series.notna()
    out = np.full(len(series), np.nan)
    if present.any():
        text = series[present].map(_level).str.strip().str.lower()
        out[present.to_numpy()] = text.map(tokens).to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
