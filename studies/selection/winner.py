"""Choosing the winning trial and deciding where the registry aliases go (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.errors import WorkbenchError
from studies.storage.study import feasible, trial_metrics

if TYPE_CHECKING:
    import optuna

    from studies.config.sections import StudyConfig


class NoWinner(WorkbenchError):
    """No COMPLETE trial qualifies."""


@dataclass(frozen=True)
class Criterion:
    """The metric champions are compared on (a test metric), and whether lower is better."""

    metric: str
    minimize: bool

    def better(self, new: float, old: float) -> bool:
        return new < old if self.minimize else new > old


def criterion(cfg: StudyConfig) -> Criterion:
    """The test counterpart of the deciding objective: val_loss -> test_loss; n_params stays."""
    specs = cfg.objective.specs()
    chosen = next((s for s in specs if s.name == cfg.registry.primary), specs[0])
    metric = "test_" + chosen.name.removeprefix("val_") if chosen.name.startswith("val_") else chosen.name
    return Criterion(metric, chosen.resolved_direction() == "minimize")


def pick_winner(study: optuna.Study, cfg: StudyConfig) -> optuna.trial.FrozenTrial:
    """Single objective: the best trial. Several: the Pareto trial that is best on the primary
    objective (the first one unless `registry.primary` says otherwise). Either way only among
    trials within `registry.limits` (objective values, or what the model costs: n_params,
    latency_*, model_bytes) and feasible under `constraints`."""
    return rank_winners(study, cfg)[0]


def rank_winners(study: optuna.Study, cfg: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    """The trials that may win, best first (`pick_winner`'s is the first): the selector tries
    the next when registering shows that the first breaks a limit after all (a serving cost
    confirmed over several measurements, studies.selection.promote)."""
    names = [m.name for m in cfg.objective.specs()]

    def within(trial: optuna.trial.FrozenTrial) -> bool:
        return feasible(trial) and cfg.eligible(trial_metrics(trial, names))

    try:
        front = [study.best_trial] if len(study.directions) == 1 else study.best_trials
    except ValueError:
        front = []
    if not front:
        raise NoWinner(f"study {study.study_name!r} has no COMPLETE trial" + (" that meets constraints" if cfg.constraints else ""))
    if len(study.directions) == 1:  # every COMPLETE trial within limits (the best among them, if it is)
        import optuna

        front = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    candidates = [t for t in front if within(t)]
    if not candidates:
        what = "Pareto-optimal trial" if len(study.directions) > 1 else "COMPLETE trial"
        raise NoWinner(f"no {what} of {study.study_name!r} meets registry.limits")
    primary = names.index(cfg.registry.primary or names[0])
    sign = 1.0 if study.directions[primary].name == "MINIMIZE" else -1.0
    return sorted(candidates, key=lambda t: (sign * t.values[primary], t.number))


def alias_for(new: float, champion: float | None, rule: Criterion, *, force: bool = False) -> str:
    """`champion` if there is none yet, if the new version beats it, or if forced; else `challenger`."""
    if force or champion is None or rule.better(new, champion):
        return "champion"
    return "challenger"
