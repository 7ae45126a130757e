"""A regret bound over a study's trials, after Makarova et al. (2022), the idea behind Optuna's
Terminator (deprecated in Optuna 4.9, and its Gaussian process needs PyTorch): fit a GP to the
best trials and bound what is left to gain as

    min over the top trials of UCB(x)  -  min over the search space of LCB(x)     (minimising)

in the objective's own units. A small bound means the GP sees no region likely to beat the
best trial by more than that. Uses scikit-learn's GP (already a dependency: the bundled data).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

TOP_TRIALS_RATIO = 0.5  # the Terminator's defaults: the top half, at least 20 trials
MIN_TOP_TRIALS = 20


def _value(trial: FrozenTrial) -> float:
    assert trial.value is not None  # COMPLETE trials of a single-objective study
    return trial.value


def _beta(n_params: int, n_trials: int, delta: float = 0.1) -> float:
    # Srinivas et al. (2010), scaled down by 5 as in their experiments (and in Optuna's Terminator).
    return 2 * math.log(n_params * n_trials**2 * math.pi**2 / 6 / delta) / 5


def _encode(trials: list[FrozenTrial], space: dict[str, BaseDistribution], rng: np.random.Generator,
            n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Trials' params and random points of the space in [0, 1]^d (categoricals one-hot)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    seen: list[np.ndarray] = []
    sampled: list[np.ndarray] = []
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            k = len(dist.choices)
            idx = np.array([int(dist.to_internal_repr(t.params[name])) for t in trials])
            seen.append(np.eye(k)[idx])
            sampled.append(np.eye(k)[rng.integers(0, k, n_samples)])
            continue
        assert isinstance(dist, (FloatDistribution, IntDistribution))
        lo, hi = float(dist.low), float(dist.high)
        values = np.array([float(t.params[name]) for t in trials])
        if dist.log:
            lo, hi, values = math.log(lo), math.log(hi), np.log(values)
        width = (hi - lo) or 1.0
        seen.append(((values - lo) / width)[:, None])
        sampled.append(rng.random((n_samples, 1)))
    return np.hstack(seen), np.hstack(sampled)


def regret_bound(trials: list[FrozenTrial], *, minimize: bool, n_samples: int = 2048, seed: int = 0) -> float | None:
    """The regret bound of these COMPLETE trials in objective units, or None when they share no
    parameter (a GP needs a common space)."""
    import warnings

    from optuna.search_space import intersection_search_space
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    space = intersection_search_space(trials)
    if not space:
        return None
    sign = 1.0 if minimize else -1.0
    ordered = sorted(trials, key=lambda t: sign * _value(t))
    top = ordered[: max(MIN_TOP_TRIALS, int(len(ordered) * TOP_TRIALS_RATIO))]
    rng = np.random.default_rng(seed)
    x, candidates = _encode(top, space, rng, n_samples)
    y = np.array([sign * _value(t) for t in top])
    scale = float(y.std()) or 1.0
    z = (y - y.mean()) / scale
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(np.ones(x.shape[1]), (1e-2, 1e2), nu=2.5) + WhiteKernel(1e-2, (1e-6, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp = GaussianProcessRegressor(kernel, random_state=seed).fit(x, z)
    root_beta = math.sqrt(_beta(x.shape[1], len(top)))
    mean_top, std_top = gp.predict(x, return_std=True)
    mean_all, std_all = gp.predict(candidates, return_std=True)
    ucb_top = float(np.min(mean_top + root_beta * std_top))
    lcb_space = float(min(np.min(mean_all - root_beta * std_all), np.min(mean_top - root_beta * std_top)))
    return max(0.0, ucb_top - lcb_space) * scale
