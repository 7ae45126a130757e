"""The pruner wrapper that reads completed trials once per trial decides exactly as the pruner it wraps."""

from __future__ import annotations

import optuna
import pytest

from studies.config.samplers import read_completed_once_per_trial


def _curve_objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(8):
        trial.report(x + abs(step - 3) * 0.1, step)  # improves, then gets worse (for PatientPruner)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return x


@pytest.mark.parametrize(
    "make",
    [
        lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
        lambda: optuna.pruners.PercentilePruner(30.0, n_startup_trials=2),
        lambda: optuna.pruners.SuccessiveHalvingPruner(),
        lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=8),
        lambda: optuna.pruners.PatientPruner(optuna.pruners.MedianPruner(n_startup_trials=2), patience=1),
    ],
)
@pytest.mark.parametrize("rdb", [False, True], ids=["memory", "sqlite"])
def test_same_decisions_as_the_wrapped_pruner(make, rdb, tmp_path):
    outcomes = []
    for i, pruner in enumerate((make(), read_completed_once_per_trial(make()))):
        # An RDB storage reloads a running trial to read its system attributes (the rungs it passed).
        storage = f"sqlite:///{tmp_path / f'{i}.db'}" if rdb else None
        # Same name: Hyperband assigns brackets by a hash of study name and trial number.
        study = optuna.create_study(study_name="same", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0),
                                    pruner=pruner)
        study.optimize(_curve_objective, n_trials=30)
        outcomes.append([(t.state.name, t.last_step, sorted(t.system_attrs.items())) for t in study.trials])
    assert outcomes[0] == outcomes[1]
    assert any(state == "PRUNED" for state, _, _ in outcomes[0])  # the comparison means something


def test_a_running_trial_is_reloaded_once_per_trial_not_at_every_report(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    reloads = 0
    original = storage.get_trial

    def counting(trial_id):
        nonlocal reloads
        reloads += 1
        return original(trial_id)

    storage.get_trial = counting
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=read_completed_once_per_trial(optuna.pruners.SuccessiveHalvingPruner()))
    study.optimize(_curve_objective, n_trials=5)
    # Optuna's own: a start, a tell, an end; ours: one at the first report (8 reports a trial).
    assert reloads <= 5 * 4
    assert any(k.startswith("completed_rung") for t in study.trials for k in t.system_attrs)


def test_completed_trials_are_read_once_per_trial():
    calls = []
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=read_completed_once_per_trial(optuna.pruners.MedianPruner(n_startup_trials=1)))
    original = study.get_trials

    def counting(deepcopy=True, states=None):
        calls.append(states)
        return original(deepcopy=deepcopy, states=states)

    study.get_trials = counting
    study.optimize(_curve_objective, n_trials=5)
    completed_reads = [s for s in calls if s == (optuna.trial.TrialState.COMPLETE,)]
    assert len(completed_reads) <= 5  # one per trial, not one per report (8 a trial)


def test_a_trial_reports_its_best_value_so_far():
    """What a trial reports each epoch is the value it would end with if it stopped there: the best
    epoch so far (fit ends with that epoch's weights), so a noisy epoch at a rung does not prune it."""
    from studies.engines.objective import _RunningBest

    lowest = _RunningBest("min")
    assert [lowest.add(v) for v in (0.5, float("nan"), 0.7, 0.3, float("inf"), 0.4)] == [0.5, 0.5, 0.5, 0.3, 0.3, 0.3]
    highest = _RunningBest("max")
    first = highest.add(float("nan"))  # nothing finite yet: reported as it came
    assert first != first and [highest.add(v) for v in (0.8, 0.9, 0.85)] == [0.8, 0.9, 0.9]


def _prior(x: float, number: int) -> optuna.trial.FrozenTrial:
    prior = optuna.trial.create_trial(params={"x": x}, distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
                                      value=x, intermediate_values={s: x + abs(s - 3) * 0.1 for s in range(8)})
    prior.number = -1 - number
    return prior


def test_a_warm_starts_priors_are_rivals_at_each_rung_of_successive_halving():
    """The source's best runs first in a warm-started study: alone at a rung, it would be the bar
    every later trial must beat (successive halving promotes the top third, with fewer than three
    the best). With the source's trials as rivals, the second-best trial goes on."""
    from studies.engines.priors import for_pruner

    priors = [_prior(0.05 * (i + 2), i) for i in range(18)]
    states = []
    for rivals in (False, True):
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
        pruner = read_completed_once_per_trial(inner, for_pruner(inner, priors) if rivals else ())
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), pruner=pruner)
        study.enqueue_trial({"x": 0.0})
        study.enqueue_trial({"x": 0.05})
        study.optimize(_curve_objective, n_trials=2)
        states.append([t.state.name for t in study.trials])
    assert states == [["COMPLETE", "PRUNED"], ["COMPLETE", "COMPLETE"]]
    # Each prior's rungs: its value at steps 1, 3 (and 9, which no prior reached).
    seen = for_pruner(optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3), priors[:1])
    assert seen[0].system_attrs == {"completed_rung_0": pytest.approx(0.3), "completed_rung_1": pytest.approx(0.1)}
    assert priors[0].system_attrs == {}  # the sampler's priors are left as they are
    # A source that pruned none: rung 1 only for the top third at rung 0. None from NaN.
    sh = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    rungs = [sorted(p.system_attrs) for p in for_pruner(sh, priors)]
    assert rungs == [["completed_rung_0", "completed_rung_1"]] * 6 + [["completed_rung_0"]] * 12
    rungs = [sorted(p.system_attrs) for p in for_pruner(sh, priors, minimize=False)]
    assert rungs == [["completed_rung_0"]] * 12 + [["completed_rung_0", "completed_rung_1"]] * 6
    # A source that pruned: each prior's rungs as far as it ran there.
    cut = [_prior(0.05 * (i + 2), i) for i in range(3)]
    cut[0].state, cut[0].intermediate_values = optuna.trial.TrialState.PRUNED, {s: 0.3 for s in range(2)}
    assert [sorted(p.system_attrs) for p in for_pruner(sh, cut)] == [["completed_rung_0"]] + [["completed_rung_0", "completed_rung_1"]] * 2
    diverged = _prior(0.5, 18)
    diverged.intermediate_values = {1: float("nan"), 3: 0.1}
    assert for_pruner(sh, [diverged])[0].system_attrs == {}
    assert for_pruner(optuna.pruners.MedianPruner(), priors) == priors
    assert for_pruner(optuna.pruners.HyperbandPruner(), priors) == []
    assert for_pruner(optuna.pruners.SuccessiveHalvingPruner(), priors) == []  # min_resource "auto": not known yet
