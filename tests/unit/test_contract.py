"""models.contract: what tracking writes when it logs a model is what serving reads back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from models.contract import TABLE_FILE, ContractError, ModelContract
from models.datasets import DataSpec
from models.tabular import TableEncoder


def write_folder(folder, contract: ModelContract, **provenance) -> None:
    """The files a logged model has that the contract is about: MLmodel metadata, table.json."""
    (folder / "artifacts").mkdir(parents=True)
    if contract.table is not None:
        contract.write_table(folder / "artifacts")
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": {}, "metadata": contract.metadata(**provenance)}))


def test_numeric_contract_round_trips(tmp_path):
    spec = DataSpec("multiclass", ("a", "b"), (np.int64(0), np.int64(1), np.int64(2)), None, (0.0, 0.0), (1.0, 1.0))
    contract = ModelContract.from_spec(spec)
    write_folder(tmp_path, contract, study="s", trial_number="3")
    assert ModelContract.read(tmp_path) == contract == ModelContract("multiclass", ["a", "b"], [0, 1, 2])


def test_table_contract_round_trips_with_its_encoding(tmp_path):
    frame = pd.DataFrame({"plan": ["a", "b", "a", None] * 10, "age": [1.0, None, 3.0, 4.0] * 10, "id": range(40)})
    table = TableEncoder.fit(frame, {"plan": "categorical", "age": "numeric", "id": "id"})
    spec = DataSpec("binary", tuple(f"x{i}" for i in range(table.width)), ("no", "yes"), None, (), (), table=table)
    contract = ModelContract.from_spec(spec)
    write_folder(tmp_path, contract)
    back = ModelContract.read(tmp_path)
    assert (back.task, back.feature_names, back.class_labels) == ("binary", ["plan", "age"], ["no", "yes"])
    assert back.table is not None and back.table.to_dict() == table.to_dict()
    assert (tmp_path / "artifacts" / TABLE_FILE).is_file()
    rows = [{"plan": "b", "age": None}, {"plan": "unseen", "age": 2.0}]
    assert np.array_equal(back.table.encode_records(rows), table.encode_records(rows))


def test_a_folder_without_the_contract_is_refused(tmp_path):
    with pytest.raises(ContractError, match="no MLmodel"):
        ModelContract.read(tmp_path)
    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"flavors": {}, "metadata": {"task": "binary"}}))
    with pytest.raises(ContractError, match="not a workbench model"):
        ModelContract.read(tmp_path)
