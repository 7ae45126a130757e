"""Mixed-type tables: kinds, the encoding learned on the training split, and the errors that name a column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models import DatasetError, load_dataset
from models.datasets import _split_indices
from models.tabular import MISSING, OTHER, TableEncoder, TableError, infer_kinds, rare_count
from studies.run import main as run_main
from tests.conftest import tiny_config


def table(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "id": [f"row-{i}" for i in range(n)],
        "size": rng.normal(10, 2, n),
        "colour": pd.Series(rng.choice(["red", "green", "blue"], n), dtype="string"),
        "shape": pd.Series(rng.choice(["round", "square"], n), dtype="category"),
        "flag": rng.random(n) < 0.5,
        "member": rng.choice(["yes", "no", "Yes"], n).astype(object),
        "label": rng.choice(["cat", "dog"], n).astype(object),
    })
    frame.loc[::10, "size"] = np.nan
    frame.loc[::7, "colour"] = None
    return frame


def test_kinds_are_inferred_from_dtypes_and_values_and_overrides_win():
    kinds = infer_kinds(table(), "label", {"id": "id"})
    assert kinds == {"id": "id", "size": "numeric", "colour": "categorical", "shape": "categorical", "flag": "boolean",
                     "member": "boolean"}
    assert infer_kinds(table(), "label", {"id": "drop", "flag": "categorical"})["flag"] == "categorical"


@pytest.mark.parametrize(("change", "overrides", "column", "message"), [
    (lambda f: f.assign(size=np.nan), {"id": "id"}, "size", "must hold at least one value (or drop it: columns: {size: drop}), got 200 missing values"),
    (lambda f: f, {"id": "id", "colour": "numeric"}, "colour", "must hold numbers to be numeric, got 'red'"),
    (lambda f: f, {"id": "id", "colour": "boolean"}, "colour", "must hold true/false or yes/no values to be boolean, got"),
    (lambda f: f, {}, "id", "looks like an identifier: mark it id (columns: {id: id}) or drop it, got 200 distinct values in 200 rows, e.g. 'row-0'"),
])
def test_columns_that_cannot_be_used_are_refused_by_name(change, overrides, column, message):
    with pytest.raises(TableError) as info:
        infer_kinds(change(table()), "label", overrides)
    assert info.value.column == column and message in info.value.message


def test_the_encoding_folds_rare_levels_marks_missing_values_and_round_trips():
    frame = table()
    assert (rare_count(100), rare_count(350), rare_count(1000), rare_count(10**6)) == (2, 3, 5, 5)
    frame.loc[:rare_count(len(frame)) - 2, "colour"] = "mauve"  # too rare in training: folded into (other)
    kinds = infer_kinds(frame, "label", {"id": "id"})
    enc = TableEncoder.fit(frame, kinds)
    colour = next(c for c in enc.columns if c.name == "colour")
    assert "mauve" not in colour.levels and set(colour.levels) == {"red", "green", "blue"}
    size = next(c for c in enc.columns if c.name == "size")
    assert size.indicator and size.mean == pytest.approx(frame["size"].mean())
    assert enc.encoded_names[:2] == ["size", "size__missing"] and f"colour={MISSING}" in enc.encoded_names
    records = [{"size": None, "colour": "violet", "shape": "round", "flag": True, "member": "YES"},
               {"size": 12.0, "colour": None, "shape": "square", "flag": "no", "member": False}]
    x = enc.encode(enc.frame_from_records(records))
    names = enc.encoded_names
    row0, row1 = dict(zip(names, x[0], strict=True)), dict(zip(names, x[1], strict=True))
    assert row0["size"] == 0.0 and row0["size__missing"] == 1.0  # imputed with the training mean, flagged
    assert row0[f"colour={OTHER}"] == 1.0 and row1[f"colour={MISSING}"] == 1.0  # unseen level, null
    assert (row0["flag"], row0["member"], row1["flag"], row1["member"]) == (1.0, 1.0, 0.0, 0.0)
    again = TableEncoder.from_dict(enc.to_dict())
    np.testing.assert_array_equal(again.encode(frame), enc.encode(frame))


def test_values_of_the_wrong_type_and_missing_or_unknown_columns_name_the_column():
    frame = table()
    enc = TableEncoder.fit(frame, infer_kinds(frame, "label", {"id": "id"}))
    good = {"size": 1.0, "colour": "red", "shape": "round", "flag": True, "member": "no"}
    _, bad = enc.encode_rows(enc.frame_from_records([good, {**good, "size": "big"}, {**good, "flag": "maybe"}]))
    assert bad == {1: ("size", "must be a number, got 'big'"), 2: ("flag", "must be a boolean (true/false, yes/no), got 'maybe'")}
    with pytest.raises(TableError) as info:
        enc.frame_from_records([good, {k: v for k, v in good.items() if k != "shape"}])
    assert (info.value.row, info.value.column) == (1, "shape") and "required column is missing" in info.value.message
    with pytest.raises(TableError, match="not a column of the model") as info:
        enc.frame_from_records([{**good, "weight": 3}])
    assert info.value.column == "weight"
    enc.frame_from_records([{**good, "id": "x"}])  # an id column may come along


def test_a_table_file_is_encoded_from_its_training_split_only(tmp_path):
    frame = table(400)
    frame.loc[3:9, "label"] = None
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    data = load_dataset(path=path, target="label", task="binary", columns={"id": "id"}, seed=4)
    assert data.notes == ("7 of 400 rows have no target value ('label'): left out",)
    enc = data.spec.table
    assert enc.ids == ("id",) and enc.feature_names == ["size", "colour", "shape", "flag", "member"]
    assert data.spec.class_labels == ("cat", "dog") and data.spec.n_features == enc.width == data.x_train.shape[1]
    # The statistics are the training rows' alone: fitted on exactly those rows, the same encoding;
    # fitted on all rows, another one.
    kept = frame[frame["label"].notna()].reset_index(drop=True)
    train, _, _ = _split_indices(np.unique(kept["label"], return_inverse=True)[1], "binary", 0.2, 0.2, 4)
    kinds = infer_kinds(kept, "label", {"id": "id"})
    assert TableEncoder.fit(kept.iloc[train], kinds) == enc != TableEncoder.fit(kept, kinds)
    np.testing.assert_array_equal(enc.encode(kept.iloc[train]), data.x_train)


@pytest.mark.parametrize(("columns", "change", "key", "message"), [
    ({"id": "id", "weight": "numeric"}, None, "columns.weight", "must be a column of the file"),
    ({"id": "id", "colour": "numeric"}, None, "columns.colour", "must hold numbers to be numeric, got 'red'"),
    ({"id": "id", "size": "drop", "colour": "drop", "shape": "drop", "flag": "drop", "member": "drop"}, None,
     "columns", "must leave at least one feature column after drop/id, got none"),
    ({"id": "id"}, lambda f: f.assign(label="cat"), "target", "needs at least 2 classes, got 1"),
    (None, None, "columns.id", "looks like an identifier: mark it id"),
])
def test_table_mistakes_name_the_config_key(tmp_path, columns, change, key, message):
    path = tmp_path / "t.csv"
    (change or (lambda f: f))(table()).to_csv(path, index=False)
    with pytest.raises(DatasetError) as info:
        load_dataset(path=path, target="label", task="binary", columns=columns)
    assert info.value.key == key and message in info.value.message


def test_the_runner_reports_a_table_mistake_with_file_and_key_path(tmp_path, home, write_config, tiny_space, capsys):
    path = tmp_path / "t.csv"
    table().to_csv(path, index=False)
    config = write_config(tiny_config(tiny_space, dataset={"path": str(path), "target": "label",
                                                           "columns": {"id": "id", "colour": "numeric"}},
                                      model={"family": "mlp", "task": "binary"}))
    assert run_main([str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{config}: dataset.columns.colour: must hold numbers to be numeric, got 'red'")


def test_the_records_path_encodes_exactly_as_the_frame_path():
    frame = table()
    frame["code"] = pd.Series(np.arange(len(frame)) % 4, dtype="category")  # a category of integers
    enc = TableEncoder.fit(frame, infer_kinds(frame, "label", {"id": "id"}))
    records = [
        {"size": 3, "colour": "red", "shape": "round", "flag": "YES", "member": True, "code": 2},
        {"size": "4.5", "colour": None, "shape": float("nan"), "flag": 0, "member": "n", "code": 2.0},
        {"size": None, "colour": 7, "shape": "hexagon", "flag": None, "member": None, "code": "3"},
    ]
    np.testing.assert_array_equal(enc.encode_records(records), enc.encode(enc.frame_from_records(records)))
    slots = dict(zip(enc.encoded_names, enc.encode_records(records)[2], strict=True))
    assert slots["code=3"] == 1.0 and slots[f"colour={OTHER}"] == 1.0 and slots["size__missing"] == 1.0
    for bad, column in (({"size": True}, "size"), ({"flag": "maybe"}, "flag")):
        with pytest.raises(TableError) as info:
            enc.encode_records([records[0] | bad])
        assert info.value.column == column and info.value.row == 0


def test_a_tables_rows_reach_the_numpy_program_a_block_at_a_time_with_the_same_answers():
    """Batch scoring hands a table's encoded columns (EncodedRows) to the numpy program, which
    lays them out one reused block of rows at a time: the answers are the matrix's to the bit,
    for every row, a masked subset and none, with a row at fault and unseen levels among them."""
    from models.numpy_net import NetError, NumpyNet, Step

    frame = table(50, seed=1)
    enc = TableEncoder.fit(frame, infer_kinds(frame, "label", {"id": "id"}))
    raw = frame.drop(columns=["label"]).astype({"size": object})
    raw.loc[3, "size"], raw.loc[4, "colour"] = "big", "violet"
    rows, bad = enc.encoded(raw)
    matrix, bad_matrix = enc.encode_rows(raw)
    assert bad == bad_matrix == {3: ("size", "must be a number, got 'big'")}
    np.testing.assert_array_equal(rows.dense(), matrix)
    rng = np.random.default_rng(0)
    net = NumpyNet(enc.width, (
        Step("hidden", "dense", ("input",), {"kernel": rng.normal(size=(enc.width, 5)).astype(np.float32),
                                             "bias": rng.normal(size=5).astype(np.float32)}, "relu"),
        Step("out", "dense", ("hidden",), {"kernel": rng.normal(size=(5, 1)).astype(np.float32)}, "sigmoid")), "out")
    object.__setattr__(net, "_block", 8)  # 50 rows: six full blocks and a short one
    np.testing.assert_array_equal(net(rows), net(matrix))
    ok = np.ones(len(raw), dtype=bool)
    ok[[0, 3, 17]] = False
    np.testing.assert_array_equal(net(rows[ok]), net(matrix[ok]))
    assert net(rows[np.zeros(len(raw), dtype=bool)]).shape == (0, 1)
    np.testing.assert_array_equal(net(rows[[4, 3, 40]]), net(matrix[[4, 3, 40]]))
    np.testing.assert_array_equal(net(rows[10:30]), net(matrix[10:30]))
    with pytest.raises(NetError, match="the rows have"):
        NumpyNet(enc.width + 1, (Step("out", "activation", ("input",)),), "out")(rows)

    # a served model: the numpy program takes the rows as they are, any other forward pass (a
    # TensorFlow function) gets their matrix
    from serving.model import LoadedModel
    from serving.store import ResolvedModel

    def served(forward) -> LoadedModel:
        return LoadedModel(ResolvedModel("models:/t/1", "t", "1", None, None), "binary", enc.feature_names, ["cat", "dog"],
                           forward, table=enc)

    taken: list[type] = []
    np.testing.assert_array_equal(served(lambda x: taken.append(type(x)) or net(x)).predict_arrays(rows)[1],
                                  served(net).predict_arrays(rows)[1])
    assert taken == [np.ndarray]


def test_arrow_strings_python_strings_and_objects_encode_alike():
    """A string column pandas keeps in arrow is looked up there (TableEncoder._arrow_found); the
    slots match the pandas Index lookup of Python strings, unseen levels and nulls included, over
    several arrow chunks too."""
    frame = table(120, seed=2)
    enc = TableEncoder.fit(frame, infer_kinds(frame, "label", {"id": "id"}))
    raw = frame.drop(columns=["label"])
    raw.loc[5, "colour"], raw.loc[6, "colour"] = "violet", None
    expected = enc.encode(raw.astype({"colour": object}))
    arrow = raw.astype({"colour": "string[pyarrow]"})
    assert isinstance(arrow["colour"].array, pd.arrays.ArrowStringArray)
    chunked = pd.concat([arrow.iloc[:50], arrow.iloc[50:]])
    for variant in (arrow, chunked, raw.astype({"colour": "string[python]"})):
        np.testing.assert_array_equal(enc.encode(variant), expected)
