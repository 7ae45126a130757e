"""Every parameter kind of the search-space schema, and every error it reports."""

from __future__ import annotations

import pytest

from search_spaces import FixedParam, IntParam, parse_space
from search_spaces import SpaceError as ConfigError


def space(**params):
    return {"params": params}


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_space(data, "s.yaml")
    return str(info.value)


def test_every_kind_parses():
    s = parse_space(
        space(
            lr={"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            drop={"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
            n={"type": "int", "low": 1, "high": 3},
            u={"type": "int", "low": 8, "high": 64, "log": True, "per_layer": "n"},
            s={"type": "int", "low": 0, "high": 10, "step": 5},
            act={"type": "categorical", "choices": ["relu", 1, 2.5, True]},
            bs={"type": "fixed", "value": 32},
        ),
        "s.yaml",
    )
    assert isinstance(s.params["bs"], FixedParam)
    assert isinstance(s.params["u"], IntParam) and s.params["u"].per_layer == "n"
    assert s.params["act"].choices == ["relu", 1, 2.5, True]


def test_yaml_style_numbers_are_accepted():
    # PyYAML reads `1e-4` (no dot) as a string; it must still be a valid bound.
    s = parse_space(space(lr={"type": "float", "low": "1e-4", "high": 0.1, "log": True}), "s.yaml")
    assert s.params["lr"].low == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        ({"type": "float", "low": 1.0, "high": 1.0}, "params.p.low: must be < high (1.0), got 1.0"),
        ({"type": "float", "low": 2.0, "high": 1.0}, "params.p.low: must be < high (1.0), got 2.0"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "params.p.low: must be > 0 when log is true, got 0.0"),
        ({"type": "float", "low": 0.0, "high": 1.0, "step": 0.3}, "params.p.step: must divide high - low (1) into whole steps, got 0.3"),
        ({"type": "float", "low": 0.0, "high": 1.0, "step": -0.5}, "params.p.step: must be > 0, got -0.5"),
        ({"type": "float", "low": 0.1, "high": 1.0, "step": 0.1, "log": True}, "params.p.step: cannot be combined with log: true"),
        ({"type": "float", "low": "inf", "high": 1.0}, "params.p.low: must be a finite number"),
        ({"type": "int", "low": 0, "high": 8, "log": True}, "params.p.low: must be >= 1 when log is true, got 0"),
        ({"type": "int", "low": 0, "high": 10, "step": 3}, "params.p.step: must divide high - low (10) into whole steps, got 3"),
        ({"type": "int", "low": 1, "high": 9, "step": 2, "log": True}, "params.p.step: cannot be combined with log: true, got 2"),
        ({"type": "int", "low": 1.5, "high": 3}, "params.p.low: Input should be a valid integer"),
        ({"type": "categorical", "choices": []}, "params.p.choices: must hold at least one value, got []"),
        ({"type": "categorical", "choices": [1, 1]}, "params.p.choices.1: must be unique, got a second 1"),
        ({"type": "categorical", "choices": [[1, 2]]}, "params.p.choices.0"),
        ({"type": "floaty", "low": 0}, "params.p.type: must be one of float, int, categorical, fixed, got 'floaty'"),
        ({"low": 0}, "params.p.type: required key is missing"),
        ({"type": "float", "low": 0, "high": 1, "lo": 2}, "params.p.lo: unknown key"),
        ({"type": "float", "low": 0}, "params.p.high: required key is missing"),
        ({"type": "float", "low": "abc", "high": 1}, "params.p.low: Input should be a valid number"),
    ],
)
def test_param_errors_name_the_key(param, expected):
    assert expected in error_of(space(p=param))
    assert error_of(space(p=param)).startswith("s.yaml: ")


def test_bool_and_int_choices_are_distinct():
    s = parse_space(space(p={"type": "categorical", "choices": [True, 1]}), "s.yaml")
    assert s.params["p"].choices == [True, 1]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"a": {"type": "fixed", "value": 1, "when": {"b": 1}}}, "params.a.when.b: condition on an undefined parameter, got 'b'"),
        (
            {"a": {"type": "categorical", "choices": [1], "when": {"b": 1}}, "b": {"type": "categorical", "choices": [1], "when": {"a": 1}}},
            "conditions must not form a cycle, got a -> b -> a",
        ),
        (
            {
                "a": {"type": "categorical", "choices": [1], "when": {"c": 1}},
                "b": {"type": "categorical", "choices": [1], "when": {"a": 1}},
                "c": {"type": "categorical", "choices": [1], "when": {"b": 1}},
            },
            "a -> c -> b -> a",
        ),
        ({"a": {"type": "categorical", "choices": [1], "when": {"a": 1}}}, "params.a.when.a: a parameter cannot depend on itself"),
        (
            {"o": {"type": "categorical", "choices": ["adam"]}, "m": {"type": "float", "low": 0, "high": 1, "when": {"o": "sgd"}}},
            "params.m.when.o: 'o' can never be 'sgd'",
        ),
        (
            {"x": {"type": "float", "low": 0, "high": 1}, "m": {"type": "float", "low": 0, "high": 1, "when": {"x": 0.5}}},
            "params.m.when.x: conditions may test categorical, int or fixed parameters, not float",
        ),
        ({"u": {"type": "int", "low": 1, "high": 4, "per_layer": "n"}}, "params.u.per_layer: must name a defined int parameter, got 'n'"),
        (
            {"n": {"type": "float", "low": 1, "high": 3}, "u": {"type": "int", "low": 1, "high": 4, "per_layer": "n"}},
            "params.u.per_layer: the layer count 'n' must be an int parameter",
        ),
        (
            {"n": {"type": "int", "low": 1, "high": 100}, "u": {"type": "int", "low": 1, "high": 4, "per_layer": "n"}},
            "params.u.per_layer: layer counts must lie in 0..64, got 1..100",
        ),
        (
            {"n": {"type": "int", "low": 1, "high": 2}, "u": {"type": "int", "low": 1, "high": 4, "per_layer": "n"}, "u_1": {"type": "fixed", "value": 1}},
            "params.u_1: clashes with layer 1 of per-layer parameter 'u'",
        ),
        ({"bad-name": {"type": "fixed", "value": 1}}, "params.bad-name: a parameter name must be an identifier"),
    ],
)
def test_reference_errors(params, expected):
    assert expected in error_of({"params": params})


def test_empty_and_malformed_spaces():
    assert "params: must define at least one parameter" in error_of({"params": {}})
    assert "params: required key is missing" in error_of({})
    assert "must be a mapping with a 'params' key, got list" in error_of([1, 2])


def test_fingerprint_ignores_descriptions_but_not_ranges():
    a = parse_space(space(p={"type": "int", "low": 1, "high": 3}), "s")
    b = parse_space(space(p={"type": "int", "low": 1, "high": 3, "description": "x"}), "s")
    c = parse_space(space(p={"type": "int", "low": 1, "high": 4}), "s")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
