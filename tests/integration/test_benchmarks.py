"""Benchmark scripts still run (smoke run with --quick; the full runs are not part of CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_tracking_overhead_quick(mlflow_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    out = subprocess.run([sys.executable, "benchmarks/tracking_overhead.py", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].startswith("ours/off: invocation ")


def test_serving_quick():
    out = subprocess.run([sys.executable, "benchmarks/serving.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("ours/noop req/s = ") and "batch ours/floor" in lines[-1]
    assert lines[-2].startswith("metrics on/off req/s = ") and "p50 v2/predict" in lines[-2]
    assert any(line.startswith("ours-shadow ") for line in lines) and any(line.startswith("ours-v2 ") for line in lines)


def test_serving_reliability_quick():
    """A champion change under load: no failed request, answers from both versions, exit 0."""
    last = _quick("benchmarks/serving_reliability.py", {})[-1]
    assert last.startswith("headline: failed requests = 0 (goal 0); versions ['1', '2']") and "exit code 0" in last


def _quick(script: str, env: dict) -> list[str]:
    out = subprocess.run([sys.executable, script, "--quick"], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


def test_storage_overhead_quick(postgres_url):
    last = _quick("benchmarks/storage_overhead.py", {"WORKBENCH_TEST_POSTGRES_URL": postgres_url})[-1]
    assert last.startswith("headline: worst ours ") and "peak PostgreSQL connections" in last


def test_workers_quick(postgres_url):
    last = _quick("benchmarks/workers.py", {"WORKBENCH_TEST_POSTGRES_URL": postgres_url})[-1]
    assert last.startswith("headline: 2 workers / 1 worker = ")


def test_search_efficiency_quick():
    lines = _quick("benchmarks/search_efficiency.py", {})
    assert any(line.startswith("optuna ") for line in lines) and any(line.startswith("kt_hyperband ") for line in lines)
    assert lines[-2].startswith("over the whole budget: optuna's / KT Hyperband's mean distance from the seed's best")
    assert lines[-1].startswith("headline: optuna time to reach KT Hyperband's best / KT Hyperband's time")


def test_tabular_quick():
    last = _quick("benchmarks/tabular.py", {})[-1]
    assert last.startswith("trial ours/peer = ") and "req/s ours/noop" in last and "batch ours/floor" in last


def test_batch_quick(postgres_url):
    out = subprocess.run([sys.executable, "benchmarks/batch.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "WORKBENCH_TEST_POSTGRES_URL": postgres_url})
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("files", "postgres", "dask", "dask cold"):
        assert re.search(rf"^{name} +[\d,]+ rows/s vs .*: [\d.]+x", out.stdout, re.M), out.stdout
    assert re.search(r"^dask +the single process kept [\d.]+ of this machine's \d+ cores busy", out.stdout, re.M), out.stdout
    assert "goals met:" in out.stdout


def test_warm_start_quick():
    last = _quick("benchmarks/warm_start.py", {})[-1]
    assert last.startswith("median over 1 seeds: the warm start needs") and "x the trials of a cold start" in last
