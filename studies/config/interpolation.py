"""`${VAR}` interpolation, compose's syntax, for study configs and for `compose.yaml` (scripts/stack.py).

`$$` is a literal `$`; `$VAR` and `${VAR}` the variable; `${VAR:-default}` the default when VAR is
unset or empty, `${VAR-default}` only when unset; `${VAR:?message}` / `${VAR?message}` stop with
the message. A plain `${VAR}` that is unset is an error in a study config (`strict`, the
default: a typo must not become an empty string) and the empty string in compose's reading.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from models.errors import ConfigError

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(data: Any, source: str = "", path: str = "", *, environ: Mapping[str, str] | None = None,
                strict: bool = True) -> Any:
    """`data` (a YAML tree) with every string interpolated; a problem is a ConfigError at its key path."""
    env = os.environ if environ is None else environ
    if isinstance(data, dict):
        return {k: interpolate(v, source, f"{path}.{k}" if path else str(k), environ=env, strict=strict)
                for k, v in data.items()}
    if isinstance(data, list):
        return [interpolate(v, source, f"{path}.{i}" if path else str(i), environ=env, strict=strict)
                for i, v in enumerate(data)]
    if not isinstance(data, str):
        return data

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1) or match.group(4), match.group(2), match.group(3) or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ConfigError.single(source, path, f"{name}: {arg or 'required variable is not set'}")
        if value is None and strict:
            raise ConfigError.single(source, path, f"environment variable {name} is not set "
                                     f"(write ${{{name}:-default}} for a default)")
        return value or ""

    return _VAR.sub(replace, data)
