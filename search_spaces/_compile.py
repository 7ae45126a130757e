"""Pure compilation of a search space into Optuna distributions, and sampling from it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search_spaces._params import (
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    SearchSpace,
    layer_counts,
    same_value,
)
from search_spaces._problems import FieldError

if TYPE_CHECKING:
    import optuna

Suggest = Callable[[str, BaseDistribution], Any]


def to_distribution(param: FloatParam | IntParam | CategoricalParam) -> BaseDistribution:
    """The Optuna distribution of one (non-fixed) parameter."""
    if isinstance(param, FloatParam):
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return IntDistribution(param.low, param.high, log=param.log, step=param.step)
    return CategoricalDistribution(tuple(param.choices))


def compile_space(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Every flat parameter name the space can sample, with its distribution.

    A per-layer parameter `units` over `n_layers` in 1..3 gives `units_0`, `units_1`, `units_2`.
    Fixed parameters are not sampled, so they have no distribution.
    """
    out: dict[str, BaseDistribution] = {}
    for name in space.order():
        param = space.params[name]
        if isinstance(param, FixedParam):
            continue
        dist = to_distribution(param)
        if param.per_layer is None:
            out[name] = dist
        else:
            for i in range(max(layer_counts(space.params[param.per_layer]))):
                out[f"{name}_{i}"] = dist
    return out


def conditions_hold(when: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    """Whether every condition of a `when` clause holds for the values sampled so far."""
    for key, expected in when.items():
        if key not in values:
            return False
        allowed = expected if isinstance(expected, list) else [expected]
        if not any(same_value(values[key], a) for a in allowed):
            return False
    return True


def sample(space: SearchSpace, suggest: Suggest) -> dict[str, Any]:
    """Sample one configuration: conditional params only when active, per-layer ones as lists."""
    values: dict[str, Any] = {}
    for name in space.order():
        param = space.params[name]
        if not conditions_hold(param.when, values):
            continue
        if isinstance(param, FixedParam):
            values[name] = param.value
        elif param.per_layer is None:
            values[name] = suggest(name, to_distribution(param))
        elif param.per_layer in values:
            dist = to_distribution(param)
            values[name] = [suggest(f"{name}_{i}", dist) for i in range(int(values[param.per_layer]))]
    return values


def from_flat(space: SearchSpace, flat: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild structured params from a trial's flat params (e.g. to replay a trial)."""

    def lookup(name: str, _dist: BaseDistribution) -> Any:
        if name not in flat:
            raise KeyError(f"the trial has no value for parameter {name!r}")
        return flat[name]

    return sample(space, lookup)


def optuna_suggest(trial: optuna.Trial) -> Suggest:
    """A `suggest` function backed by an Optuna trial's public suggest API."""

    def suggest(name: str, dist: BaseDistribution) -> Any:
        if isinstance(dist, FloatDistribution):
            return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        if isinstance(dist, IntDistribution):
            return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
        return trial.suggest_categorical(name, dist.choices)  # type: ignore[attr-defined]

    return suggest


def grid_values(space: SearchSpace) -> dict[str, list[Any]]:
    """The grid of every sampled parameter, for Optuna's GridSampler.

    Raises FieldError naming the first parameter that has no finite grid (a float without `step`).
    """
    grid: dict[str, list[Any]] = {}
    for name, dist in compile_space(space).items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = round((dist.high - dist.low) / dist.step)
            grid[name] = [round(dist.low + i * dist.step, 12) for i in range(n + 1)]
        else:
            base = name if name in space.params else name.rsplit("_", 1)[0]
            raise FieldError(f"params.{base}", "the grid sampler needs a finite grid: give a float a step, and no log")
    return grid
