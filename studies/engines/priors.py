"""A sampler that also learns from trials outside its study: a warm start's prior observations
(studies.storage.warm_start). The sampler reads the study's trials through a view that lists the
priors first; everything that writes (a trial's attributes, the study's state) reaches the real
study. The pruner compares a trial against them too (`for_pruner`), and nothing else (budget,
winner, reports) ever sees them.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial, TrialState


class _StudyWithPriors:
    """The study as the sampler sees it: its own trials plus the priors (read-only queries)."""

    def __init__(self, study: optuna.Study, priors: Sequence[FrozenTrial]) -> None:
        self._study = study
        self._priors = list(priors)

    def _matching(self, states: Container[TrialState] | None) -> list[FrozenTrial]:
        return [t for t in self._priors if states is None or t.state in states]

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        own = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [*self._matching(states), *own]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [*self._matching(states), *self._study.get_trials(deepcopy=deepcopy, states=states)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def for_pruner(pruner: optuna.pruners.BasePruner, priors: Sequence[FrozenTrial], *, minimize: bool = True) -> list[FrozenTrial]:
    """The priors as `pruner` compares a trial against them, or none where it cannot. Median and
    percentile pruners read finished trials' intermediate values, which priors carry. Successive
    halving reads the value each trial had at each rung it reached (its `completed_rung_<k>`
    system attributes): here the prior's value at the rung's step, up to a value that is not
    finite. A source that pruned decided itself how far each of its trials ran; from a source that
    pruned none, only the priors successive halving would have let reach a rung count there (the
    top third of those at the rung before), else every long prior would lower the bar.
    Without them, a warm-started study's first trial (the source's best, queued first) set the
    bar of every rung alone, since successive halving promotes the top third of the trials that
    reached a rung, and with fewer than three only the best: in `benchmarks/warm_start.py` the
    warm study never improved on the source's best in three seeds of five (0.89x a cold start's
    trials; 0.70x with the source's trials as rivals). Hyperband and the other pruners keep to
    the study's own trials. The caller gives priors only from a source trained on the same data."""
    import optuna

    kind = type(pruner)
    if kind in (optuna.pruners.MedianPruner, optuna.pruners.PercentilePruner):
        return list(priors)
    sh: Any = pruner
    if kind is not optuna.pruners.SuccessiveHalvingPruner or sh._min_resource is None:  # None: "auto", not known yet
        return []
    pruned = any(p.state == optuna.trial.TrialState.PRUNED for p in priors)
    rungs: list[dict[str, float]] = [{} for _ in priors]
    reaching = list(range(len(priors)))  # the priors that reach the current rung
    rung = 0
    while reaching:
        step = sh._min_resource * sh._reduction_factor ** (sh._min_early_stopping_rate + rung)
        values: dict[int, float] = {}
        for i in reaching:
            value = priors[i].intermediate_values.get(step)
            if value is not None and math.isfinite(value):
                values[i] = value
        for i, value in values.items():
            rungs[i][f"completed_rung_{rung}"] = value
        ranked = sorted(values, key=lambda i: values[i] if minimize else -values[i])
        reaching = ranked if pruned else ranked[:max(1, len(ranked) // sh._reduction_factor)]
        rung += 1
    seen = []
    for prior, attrs in zip(priors, rungs, strict=True):
        seen.append(copy.copy(prior))
        seen[-1].system_attrs = attrs
    return seen


def with_priors(sampler: optuna.samplers.BaseSampler, priors: Sequence[FrozenTrial]) -> optuna.samplers.BaseSampler:
    """`sampler`, sampling as if `priors` were finished trials of the study."""
    return _priors_class()(sampler, priors)


@functools.cache
def _priors_class() -> type:
    import optuna

    class SamplerWithPriors(optuna.samplers.BaseSampler):
        def __init__(self, inner: optuna.samplers.BaseSampler, priors: Sequence[FrozenTrial]) -> None:
            self.inner = inner
            self.priors = list(priors)

        def _view(self, study: optuna.Study) -> Any:
            return _StudyWithPriors(study, self.priors)

        def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
            return self.inner.infer_relative_search_space(self._view(study), trial)

        def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
            return self.inner.sample_relative(self._view(study), trial, search_space)

        def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
            return self.inner.sample_independent(self._view(study), trial, param_name, param_distribution)

        def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
            self.inner.before_trial(study, trial)

        def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.inner.reseed_rng()

        def __repr__(self) -> str:
            return f"SamplerWithPriors({self.inner!r}, {len(self.priors)} priors)"

    return SamplerWithPriors
