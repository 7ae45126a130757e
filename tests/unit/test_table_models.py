"""A mixed-type table end to end: study -> registered model with its encoding -> raw records served by
the API, by MLflow's pyfunc and by batch scoring, with the same answers; bad records name the column."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.batch.__main__ import main as batch_main
from serving.model import load
from serving.settings import ServingSettings
from serving.store import Store
from serving.versions import ModelSet
from studies.run import main as run_main
from tests.conftest import CHURN, ROOT


@pytest.fixture
def served(churn_study, monkeypatch):
    config, code = churn_study
    assert code == 0
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(config.parent / "home"))
    store = Store.at(ServingSettings())
    model = load("models:/churn_tiny@champion", store)
    with TestClient(create_app(ServingSettings(), ModelSet.fixed(model))) as client:
        yield client, model, store


def raw_records(n: int = 4) -> list[dict]:
    frame = pd.read_csv(CHURN).drop(columns=["churn", "customer_id"]).head(n)
    records = json.loads(frame.to_json(orient="records"))
    records[0]["contract"] = "lifetime"  # a level never seen in training: the (other) slot
    records[1]["total_charges"] = None  # missing: imputed and flagged
    records[2]["internet"] = None
    return records


def test_raw_records_get_the_same_answer_from_the_api_and_mlflow_pyfunc(served, monkeypatch, capsys):
    client, model, store = served
    records = raw_records()
    r = client.post("/predict", json={"records": records})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == ["no", "yes"] and set(body["predictions"]) <= {"no", "yes"} and len(body["predictions"]) == 4
    # mlflow.pyfunc finds models:/ URIs through MLflow's process-wide URIs (which other tests may have
    # set with mlflow.set_tracking_uri): point them at this store for this test only.
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", store.tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", store.registry_uri)
    pyfunc = mlflow.pyfunc.load_model("models:/churn_tiny@champion")
    answer = pyfunc.predict(pd.DataFrame(records))
    assert list(answer["prediction"]) == body["predictions"]
    np.testing.assert_allclose(answer[["probability_no", "probability_yes"]].to_numpy(), body["probabilities"], atol=1e-5)
    info = client.get("/model").json()
    kinds = {c["name"]: c["kind"] for c in info["columns"]}
    assert kinds["contract"] == "categorical" and kinds["senior"] == "boolean" and kinds["tenure_months"] == "numeric"
    assert info["feature_names"] == list(kinds) and "customer_id" not in kinds
    signature = pyfunc.metadata.get_input_schema().input_names()
    assert signature == list(kinds)


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.update(tenure_months="twelve"), "records.0: 'tenure_months': must be a number, got 'twelve'"),
    (lambda r: r.update(senior="maybe"), "records.0: 'senior': must be a boolean (true/false, yes/no), got 'maybe'"),
    (lambda r: r.pop("region"), "records.0: 'region': required column is missing"),
    (lambda r: r.update(colour="red"), "records.0: 'colour': not a column of the model"),
])
def test_bad_records_are_a_422_naming_the_column(served, change, message):
    client, _, _ = served
    record = raw_records()[3]
    change(record)
    r = client.post("/predict", json={"records": [record]})
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    positional = client.post("/predict", json={"instances": [[1.0, 2.0]]})
    assert positional.status_code == 422 and "takes named records" in positional.json()["detail"]


def test_batch_scores_the_raw_file_in_order_with_ids_and_errors(served, tmp_path, capsys):
    client, model, store = served
    frame = pd.read_csv(CHURN).head(50).drop(columns=["churn"])
    frame["tenure_months"] = frame["tenure_months"].astype(object)
    frame.loc[7, "tenure_months"] = "soon"  # cannot be scored: goes to the errors file with its row number
    source = tmp_path / "raw.csv"
    frame.to_csv(source, index=False)
    out = tmp_path / "scored.parquet"
    code = batch_main(["--input", str(source), "--output", str(out), "--model", "models:/churn_tiny@champion", "--no-tracking"])
    assert code == 3  # some rows invalid
    scored = pd.read_parquet(out)
    assert list(scored["row"]) == [i for i in range(50) if i != 7]
    assert list(scored["customer_id"]) == [c for i, c in enumerate(frame["customer_id"]) if i != 7]
    errors = pd.read_csv(tmp_path / "scored.parquet.errors.csv")
    assert errors[["row", "reason"]].to_dict("records") == [{"row": 7, "reason": "'tenure_months': must be a number, got 'soon'"}]
    assert errors.loc[0, "model_name"] == "churn_tiny" and str(errors.loc[0, "model_version"]) == "1"
    # Row 0 scored in the batch equals the API's answer for the same raw record.
    record = json.loads(frame.drop(columns=["customer_id"]).head(1).to_json(orient="records"))
    api = client.post("/predict", json={"records": record}).json()
    assert scored.loc[0, "probability_yes"] == pytest.approx(api["probabilities"][0][1], abs=1e-5)


@pytest.mark.parametrize("params", [
    {"categorical_encoding": "embedding", "embedding_dim": 3, "numeric_scaling": "robust"},
    {"categorical_encoding": "one_hot", "numeric_scaling": "standard"},
])
def test_searchable_preprocessing_choices_train_save_and_load_safely(params):
    import keras

    from models import FAMILIES, load_dataset
    from models.training import fit
    from serving.model import from_directory
    from serving.store import ResolvedModel
    from studies.tracking import save_model

    data = load_dataset(path=CHURN, target="churn", task="binary", columns={"customer_id": "id"}, seed=1)
    keras.utils.set_random_seed(0)
    model = FAMILIES["mlp"].build({**params, "units": [8]}, data.spec)
    view = model.get_layer("table_view")  # models.layers.TableView
    table = data.spec.table
    categorical = [c for c in table.columns if c.kind == "categorical"]
    if params["categorical_encoding"] == "embedding":  # a kernel of min(dim, width) units per categorical column
        assert [tuple(k.shape) for k in view.kernels] == [(c.n_outputs, min(3, c.n_outputs)) for c in categorical]
        assert view.output.shape[-1] == table.width - sum(c.n_outputs for c in categorical) + sum(min(3, c.n_outputs) for c in categorical)
    else:
        assert view.kernels == [] and view.output.shape[-1] == table.width
    scaled = np.asarray(view.scale(data.x_train))
    tenure = table.columns[0]
    raw = data.x_train[:, 0] * tenure.std + tenure.mean
    if params["numeric_scaling"] == "robust":  # (raw - median) / IQR of the training split
        np.testing.assert_allclose(scaled[:, 0], (raw - tenure.median) / tenure.iqr, rtol=1e-4, atol=1e-4)
    else:  # standard: the encoding's own standardised values
        np.testing.assert_array_equal(scaled, data.x_train)
    fit(model, data, epochs=1, batch_size=64)
    path = save_model(model, data.spec, {"optuna.study_name": "t", "optuna.trial_number": "0"})
    served = from_directory(path, ResolvedModel(str(path), None, None, None, None))  # Keras safe mode: no lambdas
    np.testing.assert_allclose(np.asarray(served.forward(data.x_test[:32])), model(data.x_test[:32]).numpy(), atol=1e-5)


def test_a_network_saved_with_the_earlier_column_layers_still_loads_and_serves(tmp_path):
    """Before models.layers.TableView, a table's embeddings were a Columns block and a bias-free
    Dense per categorical column, joined by a Concatenate: such a registered network still loads
    (safe mode) and is still served by its numpy program."""
    import keras

    from models import load_dataset
    from models.export import export_checked
    from models.layers import Columns
    from serving.model import from_directory
    from serving.store import ResolvedModel
    from studies.tracking import save_model

    data = load_dataset(path=CHURN, target="churn", task="binary", columns={"customer_id": "id"}, seed=1)
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(data.spec.n_features,), name="features")
    parts, dense, j = [], [], 0
    for i, c in enumerate(data.spec.table.columns):
        if c.kind == "categorical":
            block = Columns(list(range(j, j + c.n_outputs)), name=f"onehot_{i}")(inputs)
            parts.append(keras.layers.Dense(2, use_bias=False, name=f"embedding_{i}")(block))
        else:
            dense += list(range(j, j + c.n_outputs))
        j += c.n_outputs
    x = keras.layers.Concatenate(name="table_features")([Columns(dense, name="dense_columns")(inputs), *parts])
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="probability")(x))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    assert export_checked(model, data.x_test).net is not None
    path = save_model(model, data.spec, {"optuna.study_name": "t", "optuna.trial_number": "0"})
    served = from_directory(path, ResolvedModel(str(path), None, None, None, None))
    np.testing.assert_allclose(np.asarray(served.forward(data.x_test[:32])), model(data.x_test[:32]).numpy(), atol=1e-5)


def test_the_table_space_compiles_for_both_engines():
    import keras_tuner

    from search_spaces import compile_space, keras_tuner_problems, load_space, to_hyperparameters

    space = load_space(ROOT / "search_spaces" / "mlp_table.yaml")
    assert {"categorical_encoding", "embedding_dim", "numeric_scaling"} <= set(compile_space(space))
    assert keras_tuner_problems(space) == []
    hp = to_hyperparameters(space)
    assert isinstance(hp, keras_tuner.HyperParameters) and "embedding_dim" in {p.name for p in hp.space}


def test_the_same_command_resumes_a_table_study(churn_study, monkeypatch, capsys):
    config, code = churn_study
    assert code == 0
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(config.parent / "home"))
    capsys.readouterr()
    assert run_main([str(config)]) == 0  # same data hash and space: the study is found, its budget is met
    err = capsys.readouterr().err
    assert "study 'churn_tiny' already has 2 finished trials (budget 2)" in err


def test_v2_named_tensors_with_bytes_and_nulls_answer_like_predict(served):
    """Open Inference Protocol: one tensor per raw column; BYTES for categories, BOOL for booleans,
    null (JSON) for a missing value; the answer equals /predict's on the same records."""
    client, model, _ = served
    records = raw_records()
    kinds = {c.name: c.kind for c in model.table.columns}
    def datatype(kind, values):
        if kind == "numeric":
            return "FP64"
        return "BOOL" if all(isinstance(v, bool) for v in values) else "BYTES"  # "yes"/"no", or null (missing)

    inputs = [{"name": name, "shape": [len(records)], "datatype": datatype(kind, [r[name] for r in records]),
               "data": [r[name] for r in records]} for name, kind in kinds.items()]
    assert {"BOOL", "BYTES", "FP64"} == {i["datatype"] for i in inputs}
    meta = client.get("/v2/models/churn_tiny").json()
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["contract"] == "BYTES"
    r = client.post("/v2/models/churn_tiny/infer", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    body = client.post("/predict", json={"records": records}).json()
    assert out["label"] == body["predictions"]
    np.testing.assert_allclose(np.reshape(out["probabilities"], (len(records), 2)), body["probabilities"], atol=1e-6)
    inputs[0] = {**inputs[0], "datatype": "BYTES", "data": ["twelve"] * len(records)}
    r = client.post("/v2/models/churn_tiny/infer", json={"inputs": inputs})
    assert r.status_code == 400 and "a numeric column takes FP32/FP64/INT*, got BYTES" in r.json()["error"]


def test_a_table_models_serving_costs_are_timed_on_its_raw_records(churn_study, served):
    """The churn study's trials recorded /predict latencies of raw records (its typical one),
    and the registered model answers that record through the probe as the API would."""
    import optuna

    from serving.probe import predict_bodies, probe

    config, code = churn_study
    assert code == 0
    trials = optuna.load_study(study_name="churn_tiny", storage=f"sqlite:///{config.parent / 'home' / 'optuna.db'}").trials
    for trial in trials:  # one burst each: their order is checked below, over 3 bursts
        assert 0 < trial.user_attrs["latency_p50_ms"] < 100 and 0 < trial.user_attrs["latency_batch64_ms"] < 100
    _, model, _ = served
    record = model.table.typical_record()
    assert set(record) == set(model.feature_names) and model.encode_records([record]).shape == (1, model.input_width)
    one, batch = predict_bodies(np.zeros((1, 1)), model.table)
    assert json.loads(one) == {"records": [record]} and len(json.loads(batch)["records"]) == 64
    latency = probe().confirm(model, one, batch, bursts=3)  # one burst under the other test worker's load inverted them once
    assert 0 < latency.p50_ms < latency.batch64_ms
