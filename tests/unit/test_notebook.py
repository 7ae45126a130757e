"""notebooks/analysis.ipynb runs top to bottom (nbclient) on a small study with pruned trials and
a champion, reading only MLflow (the embedded store the runner wrote, found as every command finds it)."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from studies.run import main as run_main
from tests.conftest import ROOT, tiny_config

NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_notebook_runs_against_a_small_study(home, write_config, tiny_space, monkeypatch, tmp_path):
    # An upper threshold of 0.66 on val_loss after epoch 0 prunes some trials and keeps others.
    cfg = write_config(tiny_config(tiny_space, study={"name": "nb_study", "seed": 3}, budget={"n_trials": 8},
                                   pruner={"type": "threshold", "options": {"upper": 0.66}},
                                   training={"epochs": 3, "batch_size": 128, "early_stopping_patience": None}))
    assert run_main([str(cfg)]) == 0
    # No MLFLOW_TRACKING_URI: the notebook finds the embedded store through WORKBENCH_HOME, as the runner does.
    uri = f"sqlite:///{home.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("WORKBENCH_EXPERIMENT", "nb_study")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        out.get("text", "") + json.dumps(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert f"tracking URI: {uri}" in text
    assert "study 'nb_study' (optuna, sampler random): 8 trial runs, objective val_loss (minimize)" in text
    assert "nb_study v1 @champion <- trial" in text
    assert "loads for serving: task binary, 30 features, classes ['benign', 'malignant']" in text
    assert "PRUNED" in text and "COMPLETE" in text
    figures = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
               if "application/vnd.plotly.v1+json" in out.get("data", {})]
    assert len(figures) == 4, text  # best so far, importances, parallel coordinates, epochs by state
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("variable", ["WORKBENCH_EXPERIMENT"])
def test_notebook_says_what_is_missing(home, monkeypatch, tmp_path, variable):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'empty.db'}")
    monkeypatch.setenv(variable, "no_such_experiment")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                            allow_errors=True)
    client.execute()
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert errors and "no study runs in experiment 'no_such_experiment'" in errors[0]["evalue"]
