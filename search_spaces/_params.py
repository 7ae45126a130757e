"""Typed schema of a search-space file: one model per parameter kind, keyed on `type`."""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from search_spaces._problems import FieldError

# bool first: YAML `true` must stay a bool, not become 1.
Scalar = StrictBool | StrictInt | StrictFloat | StrictStr
ConditionValue = Scalar | list[Scalar]

MAX_LAYERS = 64
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def same_value(a: Any, b: Any) -> bool:
    """Equality that keeps bools apart from ints (True != 1 here)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    when: dict[str, ConditionValue] = Field(default_factory=dict)
    per_layer: str | None = None
    description: str | None = None


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        for field in ("low", "high"):
            if not math.isfinite(getattr(self, field)):
                raise FieldError(field, f"must be a finite number, got {getattr(self, field)}")
        _check_range(self.low, self.high, self.log, self.step, integer=False)
        return self


class IntParam(_Param):
    type: Literal["int"]
    low: StrictInt
    high: StrictInt
    log: bool = False
    step: StrictInt = 1

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, self.step, integer=True)
        return self


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[Scalar]

    @model_validator(mode="after")
    def _check(self) -> CategoricalParam:
        if not self.choices:
            raise FieldError("choices", "must hold at least one value, got []")
        for i, value in enumerate(self.choices):
            if any(same_value(value, earlier) for earlier in self.choices[:i]):
                raise FieldError(f"choices.{i}", f"must be unique, got a second {value!r}")
        return self


class FixedParam(_Param):
    type: Literal["fixed"]
    value: Scalar


def _check_range(low: float, high: float, log: bool, step: float | None, *, integer: bool) -> None:
    if low >= high:
        raise FieldError("low", f"must be < high ({high}), got {low}")
    if log:
        floor = 1 if integer else 0
        if low <= 0 or low < floor:
            rule = ">= 1" if integer else "> 0"
            raise FieldError("low", f"must be {rule} when log is true, got {low}")
        if step is not None and not (integer and step == 1):
            raise FieldError("step", f"cannot be combined with log: true, got {step}")
    if step is not None:
        if step <= 0:
            raise FieldError("step", f"must be > 0, got {step}")
        n_steps = (high - low) / step
        if abs(n_steps - round(n_steps)) > 1e-9 * max(1.0, n_steps):
            raise FieldError(
                "step", f"must divide high - low ({high - low:g}) into whole steps, got {step}"
            )


Param = Annotated[
    FloatParam | IntParam | CategoricalParam | FixedParam, Field(discriminator="type")
]


class SearchSpace(BaseModel):
    """A named set of hyperparameters, some conditional, some repeated per layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    description: str | None = None
    params: dict[str, Param]

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if not self.params:
            raise FieldError("params", "must define at least one parameter, got {}")
        for name, param in self.params.items():
            _check_references(self, name, param)
        self.order()  # raises on a cycle
        return self

    def dependencies(self, name: str) -> list[str]:
        """Parameters that must be sampled before `name`."""
        param = self.params[name]
        deps = list(param.when)
        if param.per_layer:
            deps.append(param.per_layer)
        return deps

    def order(self) -> list[str]:
        """Parameter names in sampling order: declaration order, dependencies first."""
        done: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                cycle = " -> ".join([*visiting[visiting.index(name) :], name])
                raise FieldError(f"params.{name}.when", f"conditions must not form a cycle, got {cycle}")
            visiting.append(name)
            for dep in self.dependencies(name):
                visit(dep)
            visiting.pop()
            done.append(name)

        for name in self.params:
            visit(name)
        return done

    def fingerprint(self) -> str:
        """A hash of what is sampled (names, kinds, ranges, conditions), not of comments."""
        payload = {
            name: param.model_dump(exclude={"description"}, mode="json")
            for name, param in sorted(self.params.items())
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def conditioning_params(self) -> set[str]:
        """Parameters that other parameters' `when` clauses test."""
        return {key for param in self.params.values() for key in param.when}


def layer_counts(param: Any) -> list[int]:
    """The layer counts a per-layer count parameter can take."""
    if isinstance(param, IntParam):
        return list(range(param.low, param.high + 1, param.step))
    if isinstance(param, CategoricalParam):
        return [int(c) for c in param.choices]
    return [int(param.value)]


def _check_references(space: SearchSpace, name: str, param: Any) -> None:
    base = f"params.{name}"
    if not _NAME.match(name):
        raise FieldError(base, f"a parameter name must be an identifier, got {name!r}")
    for key, expected in param.when.items():
        if key == name:
            raise FieldError(f"{base}.when.{key}", "a parameter cannot depend on itself")
        if key not in space.params:
            raise FieldError(f"{base}.when.{key}", f"condition on an undefined parameter, got {key!r}")
        target = space.params[key]
        if isinstance(target, FloatParam):
            raise FieldError(f"{base}.when.{key}", "conditions may test categorical, int or fixed parameters, not float")
        if target.per_layer:
            raise FieldError(f"{base}.when.{key}", "conditions cannot test a per-layer parameter")
        for value in expected if isinstance(expected, list) else [expected]:
            if not _can_take(target, value):
                raise FieldError(f"{base}.when.{key}", f"{key!r} can never be {value!r}")
    if param.per_layer is not None:
        count = space.params.get(param.per_layer)
        path = f"{base}.per_layer"
        if count is None:
            raise FieldError(path, f"must name a defined int parameter, got {param.per_layer!r}")
        if count.per_layer is not None:
            raise FieldError(path, f"the layer count {param.per_layer!r} cannot itself be per-layer")
        ok_kind = isinstance(count, IntParam) or (
            isinstance(count, (CategoricalParam, FixedParam))
            and all(type(v) is int for v in (count.choices if isinstance(count, CategoricalParam) else [count.value]))
        )
        if not ok_kind:
            raise FieldError(path, f"the layer count {param.per_layer!r} must be an int parameter")
        counts = layer_counts(count)
        if min(counts) < 0 or max(counts) > MAX_LAYERS:
            raise FieldError(path, f"layer counts must lie in 0..{MAX_LAYERS}, got {min(counts)}..{max(counts)}")
        if isinstance(param, FixedParam):
            raise FieldError(path, "a fixed parameter cannot be per-layer")
    _check_expanded_names(space, name, param)


def _check_expanded_names(space: SearchSpace, name: str, param: Any) -> None:
    if param.per_layer is None:
        return
    count = space.params[param.per_layer]
    for i in range(max(layer_counts(count))):
        flat = f"{name}_{i}"
        if flat in space.params:
            raise FieldError(f"params.{flat}", f"clashes with layer {i} of per-layer parameter {name!r}")


def _can_take(param: Any, value: Any) -> bool:
    if isinstance(param, CategoricalParam):
        return any(same_value(value, c) for c in param.choices)
    if isinstance(param, FixedParam):
        return same_value(value, param.value)
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return param.low <= value <= param.high and (value - param.low) % param.step == 0
