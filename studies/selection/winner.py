"""Choosing the winning trial and deciding where the registry aliases go (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.errors import WorkbenchError

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
    """Single objective: the best trial. Several: the Pareto trial within the limits that is best
    on the primary objective (the first one unless `registry.primary` says otherwise)."""
    if len(study.directions) == 1:
        try:
            return study.best_trial
        except ValueError:
            raise NoWinner(f"study {study.study_name!r} has no COMPLETE trial") from None
    names = [m.name for m in cfg.objective.specs()]
    front = study.best_trials
    if not front:
        raise NoWinner(f"study {study.study_name!r} has no COMPLETE trial")

    def within(trial: optuna.trial.FrozenTrial) -> bool:
        for key, limit in cfg.registry.limits.items():
            value = trial.values[names.index(key)]
            if (limit.min is not None and value < limit.min) or (limit.max is not None and value > limit.max):
                return False
        return True

    candidates = [t for t in front if within(t)]
    if not candidates:
        raise NoWinner(f"no Pareto-optimal trial of {study.study_name!r} meets registry.limits")
    primary = names.index(cfg.registry.primary or names[0])
    sign = 1.0 if study.directions[primary].name == "MINIMIZE" else -1.0
    return min(candidates, key=lambda t: (sign * t.values[primary], t.number))


def alias_for(new: float, champion: float | None, rule: Criterion, *, force: bool = False) -> str:
    """`champion` if there is none yet, if the new version beats it, or if forced; else `challenger`."""
    if force or champion is None or rule.better(new, champion):
        return "champion"
    return "challenger"
