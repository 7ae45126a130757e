"""Every model URI form loads the same way, from the project's MLflow store only.

MLflow's process-wide URIs are pointed at a decoy store here: any code path that fell back to
them (as `models:/` downloads did: issue 13, "Registered Model ... not found" and a stray
./mlflow.db) would fail to find the model or create the decoy file.
"""

from __future__ import annotations

import gc
import tempfile

import mlflow
import numpy as np
import pytest

from models import load_dataset
from serving.model import load
from serving.settings import MlflowLocation, ServingSettings
from serving.store import ModelNotFound, Store
from studies.run import main as run_main
from studies.select import main as select_main
from studies.selection.registry import Registry
from tests.conftest import tiny_config


@pytest.fixture
def decoy(tmp_path, monkeypatch):
    """MLflow's process-wide tracking and registry URIs set to an empty store; the working folder
    is an empty directory, where MLflow's own default (./mlflow.db) would appear."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    path = tmp_path / "decoy.db"
    # Set the globals themselves: mlflow.set_tracking_uri() would also export MLFLOW_TRACKING_URI,
    # which the project's settings read (as they should).
    monkeypatch.setattr(tracking_utils, "_tracking_uri", f"sqlite:///{path}")
    monkeypatch.setattr(registry_utils, "_registry_uri", f"sqlite:///{path}")
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == f"sqlite:///{path}"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return path


def test_every_model_uri_form_loads_from_the_projects_store(home, tmp_path, write_config, tiny_space, decoy, monkeypatch):
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))  # where Store.download puts what it fetches
    config = write_config(tiny_config(tiny_space, study={"name": "uris", "seed": 2}, budget={"n_trials": 1},
                                      registry={"model_name": "uri_model"}))
    assert run_main([str(config), "--no-register"]) == 0
    assert select_main([str(config)]) == 0  # the selector loads the run's model through the same store
    store = Store.at(ServingSettings())
    assert store.tracking_uri == f"sqlite:///{home.resolve() / 'mlflow.db'}" == store.registry_uri
    champion = store.client.get_model_version_by_alias("uri_model", "champion")
    folder = store.download(store.resolve(f"runs:/{champion.run_id}/model"))
    forms = ["models:/uri_model@champion", "models:/uri_model/1", f"runs:/{champion.run_id}/model", str(folder)]
    rows = load_dataset(name="breast_cancer", seed=2).x_test[:16]
    answers = {uri: load(uri, store) for uri in forms}
    assert answers["models:/uri_model@champion"].resolved.version == "1"
    assert answers[f"runs:/{champion.run_id}/model"].resolved.run_id == champion.run_id
    reference = answers[forms[0]].predict_arrays(rows)[1]
    for uri, model in answers.items():
        np.testing.assert_allclose(model.predict_arrays(rows)[1], reference, rtol=1e-5, err_msg=uri)
    np.testing.assert_allclose(Registry(store).load_keras(champion.run_id)(rows).numpy()[:, 0], reference[:, 1], rtol=1e-5)
    # A loaded model's downloaded files live as long as it does; the selector's and the local folder's
    # loads keep none: only the folder fetched above is left once the models are dropped.
    assert {m.folder for m in answers.values()} <= set(downloads.glob("workbench-model-*/*")) | {folder}
    answers.clear()
    del model  # the loop's last: the local folder's
    gc.collect()
    assert list(downloads.iterdir()) == [folder.parent] and folder.is_dir()
    # SERVING_MODEL_URI unset: the one model with a @champion; with two, an error naming both.
    assert store.default_uri() == "models:/uri_model@champion"
    store.client.create_registered_model("other_model")
    other = store.client.create_model_version("other_model", source=str(folder))
    store.client.set_registered_model_alias("other_model", "champion", other.version)
    with pytest.raises(ModelNotFound, match=r"SERVING_MODEL_URI is not set and models with a @champion: other_model, uri_model"):
        store.default_uri()
    assert not decoy.exists() and not list((tmp_path / "cwd").iterdir())


def test_a_missing_model_names_the_store_it_looked_in(home, decoy, tmp_path, monkeypatch):
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    store = Store.at(MlflowLocation())
    with pytest.raises(ModelNotFound, match=r"cannot download runs:/0123abc/model from sqlite:///"):
        store.download(store.resolve("runs:/0123abc/model"))
    assert not list(downloads.iterdir())  # a failed download leaves no folder
    with pytest.raises(ModelNotFound, match=r"cannot resolve models:/nope@champion at sqlite:///.*/home/mlflow.db"):
        load("models:/nope@champion", store)
    with pytest.raises(ModelNotFound, match="no registered model has a @champion yet"):
        store.default_uri()
    assert not decoy.exists()


def test_registry_uri_follows_the_tracking_uri_unless_set(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert (MlflowLocation().tracking_uri(), MlflowLocation().registry_uri()) == ("http://mlflow:5000",) * 2
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "postgresql://h/registry")
    assert MlflowLocation().registry_uri() == "postgresql://h/registry"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert MlflowLocation().tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
