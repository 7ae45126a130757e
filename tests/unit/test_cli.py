"""The CLI starts fast: --help and config errors never import TensorFlow."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = (
    "import sys; from studies.run import main\n"
    "code = main(sys.argv[1:])\n"
    "print('TF_IMPORTED' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'NO_TF')\n"
    "sys.exit(code)\n"
)


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_is_instant_and_light():
    result = subprocess.run([sys.executable, "-m", "studies.run", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--n-trials" in result.stdout and "--set" in result.stdout


def test_config_error_does_not_import_tensorflow():
    result = probe("configs/breast_cancer.yaml", "--set", "budget.n_trials=0")
    assert result.returncode == 2
    assert result.stderr.strip() == "configs/breast_cancer.yaml: budget.n_trials: Input should be greater than or equal to 1, got 0 (from --set budget.n_trials)"
    assert "NO_TF" in result.stdout
