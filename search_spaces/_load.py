"""Reading YAML files and turning them into validated search spaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from search_spaces._params import SearchSpace
from search_spaces._problems import SpaceError, problems_from_validation


def read_yaml(path: str | Path, *, what: str = "file") -> Any:
    """Parse a YAML file, reporting a missing file or a syntax error as a SpaceError."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError.single(str(path), "", f"{what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpaceError.single(str(path), "", f"{where}invalid YAML: {problem}") from None


def parse_space(data: Any, source: str) -> SearchSpace:
    """Validate an already-parsed mapping as a search space."""
    if not isinstance(data, dict):
        raise SpaceError.single(source, "", f"must be a mapping with a 'params' key, got {type(data).__name__}")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as e:
        raise SpaceError(source, problems_from_validation(e)) from None


def load_space(path: str | Path) -> SearchSpace:
    """Load and validate a search-space YAML file."""
    return parse_space(read_yaml(path, what="search space file"), str(path))
