"""Errors in a search-space file that point at the file and a key path."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

_KINDS = frozenset({"float", "int", "categorical", "fixed"})


class FieldError(ValueError):
    """Raised inside a validator to name the field (relative to the model) at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class SpaceError(ValueError):
    """Problems in a YAML file read here (a search space): each is `<file>: <key path>: <message>`.

    The study loader re-raises it as the project's ConfigError (models.errors): this package
    depends on neither models nor studies."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(str(self))

    @classmethod
    def single(cls, source: str, path: str, message: str) -> SpaceError:
        return cls(source, [(path, message)])

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}"
                         for path, message in self.problems)


def join_path(*parts: Any) -> str:
    """Join key-path parts with dots, skipping empty ones."""
    return ".".join(str(p) for p in parts if p is not None and str(p) != "")


def _clean_loc(loc: Iterable[Any]) -> list[str]:
    # A discriminated union puts its tag in the location (params.lr.float.low): drop it.
    out: list[str] = []
    for i, part in enumerate(loc):
        part = str(part)
        if part in _KINDS and len(out) >= 2 and out[-2] == "params" and i > 0:
            continue
        if part.startswith("function-") or part.startswith("tagged-union"):
            continue
        out.append(part)
    return out


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def problems_from_validation(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Turn a pydantic ValidationError into (key path, message) pairs."""
    problems = []
    for err in exc.errors():
        loc = _clean_loc(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc.extend(cause.field.split("."))
            message = cause.message
        else:
            message = err["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            kind = err["type"]
            if kind in ("union_tag_invalid", "union_tag_not_found"):
                ctx = err.get("ctx") or {}
                loc.append(str(ctx.get("discriminator", "type")).strip("'"))
                tags = str(ctx.get("expected_tags") or ", ".join(sorted(_KINDS))).replace("'", "")
                found = ctx.get("tag")
                message = f"must be one of {tags}, got {found!r}" if found else f"required key is missing (one of {tags})"
            elif kind == "extra_forbidden":
                message = "unknown key"
            elif kind == "missing":
                message = "required key is missing"
            elif "got" not in message and not isinstance(err.get("input"), (dict, list)):
                message = f"{message}, got {_describe(err.get('input'))}"
        problems.append((join_path(prefix, *loc), message))
    return problems
