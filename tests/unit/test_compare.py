"""studies.compare: best-so-far curves by trial and by running time, the page, the MLflow run."""

from __future__ import annotations

import datetime as dt
import math

import mlflow
import optuna
import pytest

from studies.compare import main as compare_main
from studies.reporting.best_so_far import busy_seconds, curve
from tests.conftest import tiny_config

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


def _add(study, value, start, end, state=optuna.trial.TrialState.COMPLETE):
    dist = optuna.distributions.FloatDistribution(0, 1)
    study.add_trial(optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=state, value=value if state == optuna.trial.TrialState.COMPLETE else None,
        values=None, datetime_start=T0 + dt.timedelta(seconds=start), datetime_complete=T0 + dt.timedelta(seconds=end),
        params={"x": 0.5}, distributions={"x": dist}, user_attrs={}, system_attrs={}, intermediate_values={}))


def test_busy_seconds_counts_overlaps_once_and_skips_pauses():
    # Two workers overlap on [0, 10] and [5, 12]; then a pause; then [100, 103].
    assert busy_seconds([(0, 10), (5, 12), (100, 103)]) == [10, 12, 15]
    assert busy_seconds([(0, 4), (1, 5), (2, 6), (0.5, 7)]) == [4, 5, 6, 7]
    # Short gaps are the search's own work between trials (a sampler, a tuner's oracle): they count.
    assert busy_seconds([(0, 9), (10, 19), (21, 30)]) == [9, 19, 30]
    assert busy_seconds([(0, 9), (10, 19)], pause=0.5) == [9, 18]
    assert busy_seconds([]) == []


def test_curve_is_best_so_far_in_finishing_order():
    study = optuna.create_study(study_name="a")
    _add(study, 0.5, 0, 10)
    _add(study, None, 10, 12, optuna.trial.TrialState.PRUNED)
    _add(study, 0.7, 12, 20)
    _add(study, 0.2, 1000, 1010)  # after a pause between two invocations
    c = curve(study)
    assert c.trial_numbers == [1, 2, 3, 4]
    assert c.best == [0.5, 0.5, 0.5, 0.2]
    assert c.seconds == [10, 12, 20, 30]
    assert c.counts == {"COMPLETE": 3, "PRUNED": 1, "FAIL": 0}
    assert c.time_to_reach(0.5) == 10 and c.time_to_reach(0.2) == 30 and c.time_to_reach(0.1) is None
    # The best so far's average distance from 0.2, with 1.0 before the first value: 8 + 0.3 x 20 over 40 s.
    assert c.mean_gap(0.2, 1.0, 40) == pytest.approx(14 / 40) and c.mean_gap(0.2, 1.0, 20) == pytest.approx(11 / 20)
    maxi = optuna.create_study(study_name="b", direction="maximize")
    _add(maxi, None, 0, 1, optuna.trial.TrialState.FAIL)
    _add(maxi, 0.3, 1, 2)
    _add(maxi, 0.9, 2, 3)
    c = curve(maxi)
    assert math.isnan(c.best[0]) and c.best[1:] == [0.3, 0.9] and c.time_to_reach(0.5) == 3
    assert c.mean_gap(0.9, 0.0, 4) == pytest.approx((0.9 + 0.9 + 0.6) / 4)


@pytest.fixture
def two_studies(home, write_config, tiny_space):
    """Two configs on the embedded storage whose studies exist (built without training)."""
    home.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{home / 'optuna.db'}"
    paths = []
    for name, values in (("fast", [0.6, 0.3, 0.25]), ("slow", [0.9, 0.5, 0.4, 0.3])):
        study = optuna.create_study(study_name=name, storage=storage)
        study.set_metric_names(["val_loss"])
        for i, v in enumerate(values):
            _add(study, v, 10 * i, 10 * i + 9)
        paths.append(write_config(tiny_config(tiny_space, study={"name": name}), f"{name}.yaml"))
    return paths


def test_compare_writes_the_page_and_logs_it(two_studies, home, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert compare_main([*map(str, two_studies), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    page = out.read_text()
    assert "val_loss: fast (optuna) vs slow (optuna)" in page and "plotly" in page
    assert "by running time" in page and "by finished trial" in page
    lines = {line.split()[0]: line for line in printed.splitlines() if line.startswith(("fast", "slow"))}
    # Common best = the worse final best (0.3): fast reaches it at the end of its second trial
    # (19 s, the 1 s between trials included), slow at the end of its fourth.
    assert lines["fast"].split()[-2:] == ["19.0", "s"] and lines["slow"].split()[-2:] == ["39.0", "s"]
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("comparisons")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["workbench.role"] == "comparison" and run.data.tags["workbench.studies"] == "fast,slow"
    assert run.data.metrics["best.fast"] == 0.25 and run.data.metrics["seconds_to_common_best.slow"] == 39.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert artifacts == {"reports/compare.html", "reports/compare.json"}


def test_compare_refuses_what_cannot_be_compared(two_studies, home, write_config, tiny_space, capsys):
    assert compare_main([str(two_studies[0])]) == 2
    assert "at least two study configs" in capsys.readouterr().err
    missing = write_config(tiny_config(tiny_space, study={"name": "never_run"}), "missing.yaml")
    assert compare_main([str(two_studies[0]), str(missing), "--no-tracking"]) == 1
    assert "no study named 'never_run'" in capsys.readouterr().err
    assert compare_main([str(two_studies[0]), str(two_studies[0]), "--no-tracking"]) == 2
    assert "already in this comparison" in capsys.readouterr().err
    other = optuna.create_study(study_name="acc", storage=f"sqlite:///{home / 'optuna.db'}", direction="maximize")
    other.set_metric_names(["val_accuracy"])
    _add(other, 0.9, 0, 1)
    acc = write_config(tiny_config(tiny_space, study={"name": "acc"}, objective={"metric": "val_accuracy"}), "acc.yaml")
    assert compare_main([str(two_studies[0]), str(acc), "--no-tracking"]) == 2
    assert "optimises val_accuracy (maximize), but fast optimises val_loss (minimize)" in capsys.readouterr().err
