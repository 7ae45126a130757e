"""Bundled and file datasets: deterministic splits, train-only scaling stats, and data errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.datasets import BUNDLED, DatasetError, load_dataset


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_datasets_split_deterministically(name):
    a = load_dataset(name=name, seed=3)
    b = load_dataset(name=name, seed=3)
    c = load_dataset(name=name, seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    np.testing.assert_array_equal(a.x_train, b.x_train)
    n = len(a.x_train) + len(a.x_val) + len(a.x_test)
    assert abs(len(a.x_test) - 0.2 * n) <= 1 and abs(len(a.x_val) - 0.2 * n) <= 1
    assert a.spec.task == BUNDLED[name].task
    # Scaling statistics come from the training split only.
    np.testing.assert_allclose(a.spec.feature_mean, a.x_train.mean(axis=0), rtol=1e-5, atol=1e-5)


def test_a_feature_constant_in_training_keeps_unit_scale():
    # digits has blank pixels in every training image that are inked in a few others: scaling
    # them by a zero variance turned val_loss into thousands.
    d = load_dataset(name="digits", seed=0)
    var = np.asarray(d.spec.feature_var)
    constant = d.x_train.var(axis=0) == 0
    assert constant.any() and (var[constant] == 1.0).all()
    np.testing.assert_allclose(var[~constant], d.x_train.var(axis=0)[~constant], rtol=1e-5)


def test_class_labels_travel_with_the_spec():
    d = load_dataset(name="breast_cancer")
    assert d.spec.class_labels == ("benign", "malignant") or d.spec.class_labels == ("malignant", "benign")
    assert set(np.unique(d.y_train)) == {0, 1}


def _frame(n=40):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.integers(0, 5, n), "flag": rng.random(n) > 0.5,
                         "label": np.where(rng.random(n) > 0.5, "yes", "no"), "y": rng.normal(size=n)})


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_datasets(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = _frame()
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    d = load_dataset(path=path, target="label", features=["a", "b", "flag"], task="binary")
    assert d.spec.feature_names == ("a", "b", "flag") and d.spec.class_labels == ("no", "yes")
    r = load_dataset(path=path, target="y", features=["a", "b"], task="regression")
    assert r.y_train.dtype == np.float32 and r.spec.target_std > 0


def test_file_dataset_errors(tmp_path):
    path = tmp_path / "d.csv"
    frame = _frame()
    frame["text"] = "abc"
    frame.to_csv(path, index=False)
    cases = [
        (dict(path=tmp_path / "none.csv", target="y", task="regression"), "path", "file not found"),
        (dict(path=tmp_path / "d.txt", target="y", task="regression"), "path", "must be a .csv or .parquet file"),
        (dict(path=path, target="nope", task="regression"), "target", "must be a column of the file"),
        (dict(path=path, target="y", features=["a", "zz"], task="regression"), "features.1", "got 'zz'"),
        (dict(path=path, target="y", features=["a", "y"], task="regression"), "features.1", "must not be the target"),
        (dict(path=path, target="label", features=["a"], task="regression"), "target", "column 'label' is not numeric"),
        (dict(path=path, target="b", features=["a"], task="binary"), "task", "binary needs exactly 2 target classes, got 5"),
        (dict(path=path, target="y", features=["a"]), "task", "is required for a file dataset"),
    ]
    for kwargs, key, message in cases:
        with pytest.raises(DatasetError) as info:
            load_dataset(**kwargs)
        assert info.value.key == key and message in info.value.message, (kwargs, info.value.key, info.value.message)
    # String feature columns are no longer refused: the file is a mixed-type table (models.tabular).
    mixed = load_dataset(path=path, target="y", task="regression")
    assert mixed.spec.table is not None and mixed.spec.table.feature_names == ["a", "b", "flag", "label", "text"]


def test_missing_values_and_tiny_files(tmp_path):
    frame = _frame()
    frame.loc[[3, 7], "a"] = np.nan
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    # Missing feature values are imputed (training mean) and flagged, not refused.
    gaps = load_dataset(path=tmp_path / "gaps.csv", target="y", features=["a"], task="regression")
    assert gaps.spec.feature_names == ("a", "a__missing") and np.isfinite(gaps.x_train).all()
    _frame(6).to_csv(tmp_path / "tiny.csv", index=False)
    with pytest.raises(DatasetError, match="too few rows to split into train, validation and test: need at least 10, got 6"):
        load_dataset(path=tmp_path / "tiny.csv", target="y", features=["a"], task="regression")
    with pytest.raises(DatasetError, match="must hold exactly the 64 features"):
        load_dataset(name="digits", image_shape=(4, 4, 1))
