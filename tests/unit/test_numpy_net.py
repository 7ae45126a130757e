"""A dense network exported for numpy gives Keras' answers, round-trips through its file, and is
served by a process that cannot import TensorFlow, SciPy, pandas or the training stack."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml

from models import FAMILIES, load_dataset
from models.contract import NUMPY_FILE, ModelContract
from models.export import export_checked, to_numpy
from models.numpy_net import MAX_BLOCK_ROWS, NetError, NumpyNet
from models.training import fit
from studies.tracking import save_model
from tests.conftest import CHURN, ROOT

CASES = [
    ("breast_cancer", {"units": [16, 8], "activation": "gelu", "batch_norm": True, "dropout": [0.2, 0.1]}),
    ("wine", {"units": [8], "activation": "tanh"}),
    ("iris", {"units": [8], "activation": "silu"}),
    ("diabetes", {"units": [8, 8], "activation": "relu", "batch_norm": True}),
    ("churn", {"units": [8], "categorical_encoding": "embedding", "embedding_dim": 2, "numeric_scaling": "robust"}),
    ("churn", {"units": [8], "categorical_encoding": "one_hot", "numeric_scaling": "standard"}),  # the table view: no steps
]


def _trained(dataset: str, params: dict):
    data = (load_dataset(path=CHURN, target="churn", task="binary", columns={"customer_id": "id"}, seed=0) if dataset == "churn"
            else load_dataset(name=dataset, seed=0))
    keras.utils.set_random_seed(0)
    model = FAMILIES["mlp"].build(params, data.spec)
    fit(model, data, epochs=1, batch_size=32)  # moves batch-norm statistics away from their defaults
    return model, data


@pytest.mark.parametrize(("dataset", "params"), CASES, ids=[c[0] for c in CASES])
def test_the_numpy_program_gives_keras_answers_on_the_test_split(dataset, params, tmp_path):
    model, data = _trained(dataset, params)
    export = export_checked(model, data.x_test)
    assert export.net is not None, export.reason
    keras_out = np.asarray(model.predict(data.x_test, verbose=0))
    mine = export.net(data.x_test)
    if data.spec.task == "regression":  # target units (hundreds): the same 1e-5, relative
        np.testing.assert_allclose(mine, keras_out, rtol=1e-5, atol=1e-5)
    else:
        assert np.max(np.abs(mine - keras_out)) <= 1e-5
    back = NumpyNet.load(export.net.save(tmp_path / NUMPY_FILE))
    assert np.array_equal(back(data.x_test), mine)
    # Many rows run in blocks: each row's answer is still Keras', the last partial block included.
    many = np.resize(data.x_test, (2 * MAX_BLOCK_ROWS + 123, data.x_test.shape[1]))
    np.testing.assert_allclose(export.net(many), np.asarray(model.predict(many, verbose=0, batch_size=4096)),
                               rtol=1e-5 if data.spec.task == "regression" else 0, atol=1e-5)


def test_other_layers_keep_tensorflow_and_say_which():
    data = load_dataset(name="digits", seed=0)
    model = FAMILIES["cnn"].build({"n_conv": 1, "filters": [4]}, data.spec)
    export = to_numpy(model)
    assert export.net is None and "has no numpy form" in export.reason


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(NetError, match="not a numpy network"):
        NumpyNet.load(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", graph=np.array(json.dumps({"format": "other/9"})))
    with pytest.raises(NetError, match="format 'other/9'"):
        NumpyNet.load(tmp_path / "y.npz")


# A server with nothing but the serving image's packages: the modules a numpy model must not need
# cannot be imported at all.
_BLOCKED = ["tensorflow", "keras", "scipy", "sklearn", "pandas", "optuna", "pyarrow", "studies"]
_SERVE = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked}:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
from fastapi.testclient import TestClient
from serving.app import create_app
from serving.model import from_directory
from serving.settings import ServingSettings
from serving.store import ResolvedModel, ServingError
from serving.versions import ModelSet
try:
    model = from_directory(__import__("pathlib").Path(sys.argv[1]), ResolvedModel("models:/m/1", "m", "1", None, None))
except ServingError as e:
    print(json.dumps({{"error": str(e)}}))
    raise SystemExit(0)
with TestClient(create_app(ServingSettings(), ModelSet.fixed(model))) as client:
    answer = client.post("/predict", json={{"records": json.loads(sys.argv[2])}}).json()
print(json.dumps({{"answer": answer, "modules": sorted(m for m in sys.modules if m.split(".")[0] in {blocked})}}))
"""


def _serve_without_tensorflow(folder, records) -> dict:
    out = subprocess.run([sys.executable, "-c", _SERVE.format(blocked=_BLOCKED), str(folder), json.dumps(records)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_dense_model_is_served_without_tensorflow_with_the_same_answers():
    model, data = _trained("churn", CASES[-1][1])
    folder = save_model(model, data.spec, {"optuna.study_name": "t", "optuna.trial_number": "0"})
    assert ModelContract.read(folder).runtime == "numpy" and (folder / NUMPY_FILE).is_file()
    frame = __import__("pandas").read_csv(CHURN).drop(columns=["churn", "customer_id"]).head(5)
    records = json.loads(frame.to_json(orient="records"))
    result = _serve_without_tensorflow(folder, records)
    assert result["modules"] == []
    keras_probs = np.asarray(model.predict(data.spec.table.encode_records(records), verbose=0))[:, 0]
    served = np.asarray(result["answer"]["probabilities"])[:, 1]
    assert np.max(np.abs(served - keras_probs)) <= 1e-5


def test_a_model_that_needs_tensorflow_says_so_where_there_is_none(tmp_path):
    meta = ModelContract("binary", ["a"], [0, 1]).metadata()
    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"flavors": {}, "metadata": meta}))
    result = _serve_without_tensorflow(tmp_path, [{"a": 1.0}])
    assert "needs TensorFlow" in result["error"] and "serving-tf" in result["error"]
