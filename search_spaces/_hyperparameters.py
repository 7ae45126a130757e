"""The same search space for KerasTuner: a check of what it cannot express, and compilation to
`keras_tuner.HyperParameters` (conditions through nested `conditional_scope`s, per-layer
parameters as `name_0`, `name_1`, ... active when the layer exists).

Conditions in KerasTuner test the parent's *value*, even when the parent itself is inactive, so
every parameter is declared under the conditions of all its ancestors (a chained condition
`momentum` <- `use_momentum` <- `optimizer` becomes two nested scopes). Conditions on a fixed
parameter are decided here, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search_spaces._compile import sample
from search_spaces._params import (
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    SearchSpace,
    layer_counts,
    same_value,
)

if TYPE_CHECKING:
    import keras_tuner

# (parent name, the values that activate the child); a list of them holds when all hold.
Conditions = list[tuple[str, list[Any]]]


def keras_tuner_problems(space: SearchSpace) -> list[tuple[str, str]]:
    """(key path, message) for each thing in the space that KerasTuner cannot express as written."""
    problems: list[tuple[str, str]] = []
    for name, param in space.params.items():
        if isinstance(param, CategoricalParam):
            kinds = sorted({_kind(v) for v in param.choices})
            if len(kinds) > 1:
                problems.append((f"params.{name}.choices",
                                 f"KerasTuner's Choice holds values of one type, got {' and '.join(kinds)} "
                                 f"({param.choices}); write them all as one type, or use engine: optuna"))
    return problems


def _kind(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(value)]


def conditions_of(space: SearchSpace, name: str) -> Conditions | None:
    """Every condition under which `name` is sampled, its ancestors' included; None when it never
    is (a condition on a fixed parameter that does not hold)."""
    param = space.params[name]
    out: Conditions = []
    for key, expected in param.when.items():
        allowed = expected if isinstance(expected, list) else [expected]
        parent = space.params[key]
        if isinstance(parent, FixedParam):
            if not any(same_value(parent.value, a) for a in allowed):
                return None
            continue
        inherited = conditions_of(space, key)
        if inherited is None:
            return None
        out.extend(inherited)
        out.append((key, list(allowed)))
    return out


def layer_conditions(space: SearchSpace, name: str, layer: int) -> Conditions | None:
    """The conditions of layer `layer` of a per-layer parameter: its own, and its layer count's
    being larger than `layer` (with the count's own conditions)."""
    param = space.params[name]
    own = conditions_of(space, name)
    count_name = param.per_layer
    assert count_name is not None
    count = space.params[count_name]
    if own is None:
        return None
    if isinstance(count, FixedParam):
        return own if int(count.value) > layer else None
    inherited = conditions_of(space, count_name)
    if inherited is None:
        return None
    deep = [c for c in layer_counts(count) if c > layer]
    if not deep:
        return None
    return [*own, *inherited, (count_name, deep)]


def to_hyperparameters(space: SearchSpace) -> keras_tuner.HyperParameters:
    """Every parameter of the space declared on a fresh `keras_tuner.HyperParameters`."""
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    for name in space.order():
        param = space.params[name]
        if isinstance(param, FixedParam):
            continue
        if param.per_layer is None:
            _declare(hp, name, param, conditions_of(space, name))
        else:
            for i in range(max(layer_counts(space.params[param.per_layer]))):
                _declare(hp, f"{name}_{i}", param, layer_conditions(space, name, i))
    return hp


def _declare(hp: keras_tuner.HyperParameters, name: str, param: Any, conditions: Conditions | None) -> None:
    if conditions is None:
        return
    with _scopes(hp, _dedupe(conditions)):
        if isinstance(param, FloatParam):
            hp.Float(name, param.low, param.high, step=param.step, sampling="log" if param.log else "linear")
        elif isinstance(param, IntParam):
            # KerasTuner reads a step with log sampling as a factor: leave it out (the schema allows only 1 there).
            hp.Int(name, param.low, param.high, step=None if param.log else param.step,
                   sampling="log" if param.log else "linear")
        else:
            hp.Choice(name, list(param.choices), ordered=False if isinstance(param.choices[0], bool) else None)


def _dedupe(conditions: Conditions) -> Conditions:
    out: Conditions = []
    for key, values in conditions:
        if not any(k == key and v == values for k, v in out):
            out.append((key, values))
    return out


@contextlib.contextmanager
def _scopes(hp: keras_tuner.HyperParameters, conditions: Conditions) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for key, values in conditions:
            stack.enter_context(hp.conditional_scope(key, values))
        yield


def params_from_values(space: SearchSpace, values: dict[str, Any]) -> dict[str, Any]:
    """The structured params of a KerasTuner trial (its `hyperparameters.values`), read with the
    space's own conditions; floats on a step grid are put back on it (KerasTuner's `low + k*step`
    can land a rounding error away), and numbers are kept within their range: KerasTuner's
    Bayesian oracle proposes `high + 1` for an int without a step when its optimizer returns the
    upper bound (`Int.prob_to_value` maps [0, 1) to [low, high + 1), and the bound is 1.0)."""

    def lookup(name: str, dist: Any) -> Any:
        if name not in values:
            raise KeyError(f"KerasTuner gave no value for the active parameter {name!r}")
        value = values[name]
        if isinstance(dist, FloatDistribution) and dist.step is not None:
            value = round(dist.low + round((value - dist.low) / dist.step) * dist.step, 12)
        elif isinstance(dist, IntDistribution):
            value = min(max(int(value), dist.low), dist.high)
        elif isinstance(dist, FloatDistribution):
            value = min(max(float(value), dist.low), dist.high)
        elif isinstance(dist, CategoricalDistribution):  # the choice itself: KerasTuner hands back bools as 0/1 and numbers as numpy scalars
            matches = [c for c in dist.choices if same_value(c, value)] or [c for c in dist.choices if c == value]
            if not matches:
                raise KeyError(f"KerasTuner gave {value!r} for {name!r}, not one of its choices {list(dist.choices)}")
            value = matches[0]
        return value

    return sample(space, lookup)
