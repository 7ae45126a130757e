"""Datasets: scikit-learn's bundled ones and the user's CSV/Parquet files, split by a seed.

Nothing here knows Keras, Optuna or MLflow; errors name the dataset key at fault.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from models.errors import WorkbenchError

if TYPE_CHECKING:
    from models.tabular import TableEncoder

Task = Literal["binary", "multiclass", "regression"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "regression")
MIN_ROWS = 10


@dataclass(frozen=True)
class Bundled:
    loader: str
    task: Task
    image_shape: tuple[int, ...] | None = None


# Only `load_*` functions: they ship inside scikit-learn, nothing is downloaded.
BUNDLED: dict[str, Bundled] = {
    "breast_cancer": Bundled("load_breast_cancer", "binary"),
    "wine": Bundled("load_wine", "multiclass"),
    "iris": Bundled("load_iris", "multiclass"),
    "digits": Bundled("load_digits", "multiclass", (8, 8, 1)),
    "diabetes": Bundled("load_diabetes", "regression"),
}
FILE_SUFFIXES = (".csv", ".parquet", ".pq")


class DatasetError(WorkbenchError, ValueError):
    """A problem with the data, naming the dataset key (`path`, `target`, `features`, ...)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class DataSpec:
    """What a model builder needs to know about the data, and what must travel with the model."""

    task: Task
    feature_names: tuple[str, ...]
    class_labels: tuple[str | int | float | bool, ...] | None
    image_shape: tuple[int, ...] | None
    feature_mean: tuple[float, ...]
    feature_var: tuple[float, ...]
    target_mean: float = 0.0
    target_std: float = 1.0
    # A mixed-type table: the raw columns and their fitted encoding (feature_names are then the
    # encoded columns, already standardised). None for all-numeric data.
    table: TableEncoder | None = None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_classes(self) -> int:
        return len(self.class_labels) if self.class_labels is not None else 0


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits of one dataset, as float32 arrays."""

    spec: DataSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    fingerprint: str = field(default="")
    notes: tuple[str, ...] = ()  # what loading did that a user should know (rows left out, ...)


def load_dataset(
    *,
    name: str | None = None,
    path: str | Path | None = None,
    target: str | None = None,
    features: list[str] | None = None,
    task: Task | None = None,
    image_shape: tuple[int, ...] | None = None,
    validation: float = 0.2,
    test: float = 0.2,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
) -> Dataset:
    """Load a bundled dataset by name, or a file by path, and split it deterministically.

    A file with a non-numeric or missing feature value, or with `columns` kinds given, is a
    mixed-type table: its encoding is fitted on the training split (models.tabular)."""
    notes: tuple[str, ...] = ()
    if name is not None:
        x, y, names, task, image_shape = _load_bundled(name, task, image_shape)
    elif path is not None:
        if task is None:
            raise DatasetError("task", "is required for a file dataset (binary, multiclass or regression)")
        frame, features, notes = _read_file(Path(path), target, features, columns)
        assert target is not None  # _read_file raised DatasetError("target", ...) otherwise
        if columns or image_shape is None and _mixed(frame[features]):
            return _table_dataset(frame, features, target, task, columns or {}, validation, test, seed, notes)
        x, y, names = _numeric_arrays(frame, features, target, task)
    else:
        raise DatasetError("name", "give either a bundled dataset name or a file path")
    if image_shape is not None and int(np.prod(image_shape)) != x.shape[1]:
        raise DatasetError(
            "image_shape",
            f"must hold exactly the {x.shape[1]} features (product {int(np.prod(image_shape))}), got {list(image_shape)}",
        )
    y, labels = _encode_target(y, task)
    idx = _split_indices(y, task, validation, test, seed)
    dataset = _split(x, y, names, labels, task, image_shape, idx)
    return replace(dataset, notes=notes)


def _load_bundled(name: str, task: Task | None, image_shape: tuple[int, ...] | None):
    if name not in BUNDLED:
        raise DatasetError("name", f"must be one of {', '.join(sorted(BUNDLED))}, got {name!r}")
    info = BUNDLED[name]
    if task is not None and task != info.task:
        raise DatasetError("task", f"{name!r} is a {info.task} dataset, got {task!r}")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, info.loader)()
    names = [str(n) for n in getattr(bunch, "feature_names", [])] or [f"x{i}" for i in range(bunch.data.shape[1])]
    y = bunch.target
    if info.task != "regression" and getattr(bunch, "target_names", None) is not None:
        y = np.asarray(bunch.target_names)[bunch.target]
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(y), names, info.task, image_shape or info.image_shape


def _read_file(path: Path, target: str | None, features: list[str] | None, columns: Mapping[str, str] | None):
    """The file's target and feature columns, rows with a missing target left out (and said)."""
    import pandas as pd

    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DatasetError("path", f"must be a .csv or .parquet file, got {str(path)!r}")
    if not path.is_file():
        raise DatasetError("path", f"file not found, got {str(path)!r}")
    if target is None:
        raise DatasetError("target", "is required for a file dataset: the name of the target column")
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as e:  # pandas raises many types for unreadable files
        raise DatasetError("path", f"cannot be read as {path.suffix[1:]}: {e}") from e
    names = [str(c) for c in frame.columns]
    frame.columns = names
    if target not in names:
        raise DatasetError("target", f"must be a column of the file ({_list(names)}), got {target!r}")
    for name in (columns or {}):
        if name not in names:
            raise DatasetError(f"columns.{name}", f"must be a column of the file ({_list(names)}), got {name!r}")
        if name == target:
            raise DatasetError(f"columns.{name}", "is the target column: it has no feature kind")
    if features is None:  # every column but the target and those marked id or drop
        features = [c for c in names if c != target and (columns or {}).get(c) not in ("id", "drop")]
    for i, col in enumerate(features):
        if col not in names:
            raise DatasetError(f"features.{i}", f"must be a column of the file ({_list(names)}), got {col!r}")
        if col == target:
            raise DatasetError(f"features.{i}", f"must not be the target column, got {col!r}")
    if not features:
        raise DatasetError("columns" if columns else "features", "must leave at least one feature column "
                           + ("after drop/id" if columns else "besides the target") + ", got none")
    keep = list(dict.fromkeys([*features, *(n for n, k in (columns or {}).items() if k == "id")]))
    frame = frame[[*keep, target]]
    missing_target = frame[target].isna().to_numpy()
    notes: tuple[str, ...] = ()
    if missing_target.any():
        notes = (f"{int(missing_target.sum())} of {len(frame)} rows have no target value ({target!r}): left out",)
        frame = frame.loc[~missing_target].reset_index(drop=True)
    return frame, features, notes


def _mixed(features) -> bool:
    """Any non-numeric column or any missing value: the table needs an encoding."""
    import pandas as pd

    return any(not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)) for _, s in features.items()) \
        or bool(features.isna().to_numpy().any())


def _numeric_arrays(frame, features: list[str], target: str, task: Task):
    x = np.empty((len(frame), len(features)), dtype=np.float64)
    for j, col in enumerate(features):
        x[:, j] = _numeric_column(frame[col], "features")
    y = _numeric_column(frame[target], "target") if task == "regression" else frame[target].to_numpy()
    return x, y, features


def _table_dataset(frame, features: list[str], target: str, task: Task, columns: Mapping[str, str],
                   validation: float, test: float, seed: int, notes: tuple[str, ...]) -> Dataset:
    """A mixed-type table: kinds inferred (or given), the encoding fitted on the training rows only."""
    from models.tabular import TableEncoder, TableError, infer_kinds

    try:
        kinds = infer_kinds(frame, target, columns)  # _read_file kept the features, the ids and the target
    except TableError as e:
        raise DatasetError(f"columns.{e.column}", e.message) from None
    if not any(k in ("numeric", "boolean", "categorical") for k in kinds.values()):
        raise DatasetError("columns", f"must leave at least one feature column after drop/id, got none ({_list(list(kinds))})")
    y_raw = _numeric_column(frame[target], "target") if task == "regression" else frame[target].to_numpy()
    y, labels = _encode_target(y_raw, task)
    idx = _split_indices(y, task, validation, test, seed)
    encoder = TableEncoder.fit(frame.iloc[idx[0]], kinds)
    x = encoder.encode(frame)
    names = encoder.encoded_names
    dataset = _split(x, y, names, labels, task, None, idx, scaled=True)
    return replace(dataset, spec=replace(dataset.spec, table=encoder), notes=notes)


def _numeric_column(series, key: str) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return series.astype("float64").to_numpy()
    if pd.api.types.is_numeric_dtype(series):
        return series.astype("float64").to_numpy(na_value=np.nan)
    raise DatasetError(
        key, f"column {series.name!r} is not numeric (dtype {series.dtype}); encode it as numbers or booleans first"
    )


def _encode_target(y: np.ndarray, task: Task) -> tuple[np.ndarray, tuple | None]:
    if task == "regression":
        return y.astype(np.float32), None
    labels, codes = np.unique(y, return_inverse=True)
    if len(labels) < 2:
        raise DatasetError("target", f"needs at least 2 classes, got {len(labels)} ({_list([str(v) for v in labels])})")
    if task == "binary" and len(labels) != 2:
        raise DatasetError("task", f"binary needs exactly 2 target classes, got {len(labels)}")
    return codes.astype(np.int32), tuple(label.item() if hasattr(label, "item") else label for label in labels)


def _split_indices(y: np.ndarray, task: Task, validation: float, test: float, seed: int):
    """(train, validation, test) row indices: stratified by class, deterministic in the seed."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    if n < MIN_ROWS:
        raise DatasetError("", f"too few rows to split into train, validation and test: need at least {MIN_ROWS}, got {n}")
    stratify = y if task != "regression" else None
    try:
        idx_rest, idx_test = train_test_split(np.arange(n), test_size=test, random_state=seed, stratify=stratify)
        rest_strat = y[idx_rest] if stratify is not None else None
        idx_train, idx_val = train_test_split(
            idx_rest, test_size=validation / (1 - test), random_state=seed, stratify=rest_strat
        )
    except ValueError as e:
        raise DatasetError("split", f"cannot split {n} rows by class: {e}") from None
    return idx_train, idx_val, idx_test


def _split(x, y, names, labels, task, image_shape, idx, *, scaled: bool = False) -> Dataset:
    idx_train, idx_val, idx_test = idx
    x = x.astype(np.float32, copy=False)
    x_train = x[idx_train]
    # A feature constant on the train rows (a blank pixel) keeps unit scale, as in scikit-learn's
    # StandardScaler: dividing by its zero variance would blow up any other value it takes later.
    variance = x_train.var(axis=0) if not scaled else np.ones(x.shape[1])
    variance[variance < 1e-12] = 1.0
    mean = x_train.mean(axis=0) if not scaled else np.zeros(x.shape[1])
    target_mean, target_std = 0.0, 1.0
    if task == "regression":
        target_mean, target_std = float(y[idx_train].mean()), float(y[idx_train].std() or 1.0)
    spec = DataSpec(
        task=task,
        feature_names=tuple(names),
        class_labels=labels,
        image_shape=tuple(image_shape) if image_shape else None,
        feature_mean=tuple(float(v) for v in mean),
        feature_var=tuple(float(v) for v in variance),
        target_mean=target_mean,
        target_std=target_std,
    )
    digest = hashlib.sha256()
    for part in (x, y, idx_train, idx_val, idx_test):
        # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12 (mypy checks as 3.11)
        digest.update(memoryview(np.ascontiguousarray(part)).cast("B"))  # type: ignore[arg-type]  # no copy of a contiguous array
    return Dataset(
        spec, x_train, y[idx_train], x[idx_val], y[idx_val], x[idx_test], y[idx_test], digest.hexdigest()[:16]
    )


def _list(items: list[str]) -> str:
    return ", ".join(items[:10]) + (", ..." if len(items) > 10 else "")
