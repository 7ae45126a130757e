"""Carrying a trial's flat parameters from one search space to another (warm start): pure, over
Optuna distributions only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


@dataclass(frozen=True)
class Transferred:
    """A trial's values that fit the new space, and what became of the others."""

    params: dict[str, Any]
    clipped: list[str] = field(default_factory=list)  # moved to the nearest value of the new range
    dropped: list[str] = field(default_factory=list)  # no longer a parameter, a removed choice, or out of range


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nearest(value: float, dist: FloatDistribution | IntDistribution) -> float | int:
    """The value of `dist` nearest to `value` (range, then step grid)."""
    low, high = dist.low, dist.high
    v = min(max(value, low), high)
    if dist.step is not None:
        v = low + round((v - low) / dist.step) * dist.step
        v = min(v, high - ((high - low) % dist.step))
    if isinstance(dist, IntDistribution):
        return int(min(max(round(v), low), high))
    return float(round(v, 12)) if dist.step is not None else float(v)


def transfer(params: Mapping[str, Any], target: Mapping[str, BaseDistribution], *, clip: bool) -> Transferred:
    """The values of `params` that the `target` distributions hold. A numeric value outside its
    new range is moved to the nearest one with `clip`, left out without; a value off a new step
    grid moves to the nearest grid point (with `clip`). A removed parameter or categorical
    choice, or a changed kind (numeric <-> categorical), is left out."""
    kept: dict[str, Any] = {}
    clipped: list[str] = []
    dropped: list[str] = []
    for name, value in params.items():
        dist = target.get(name)
        if dist is None:
            dropped.append(name)
        elif isinstance(dist, CategoricalDistribution):
            if any(value == c and type(value) is type(c) for c in dist.choices):
                kept[name] = value
            else:
                dropped.append(name)
        elif not _numeric(value):
            dropped.append(name)
        elif dist._contains(dist.to_internal_repr(value)):
            kept[name] = int(value) if isinstance(dist, IntDistribution) else float(value)
        elif clip:
            kept[name] = _nearest(float(value), dist)  # type: ignore[arg-type]
            clipped.append(name)
        else:
            dropped.append(name)
    return Transferred(kept, clipped, dropped)
