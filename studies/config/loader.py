"""Loading a study config: YAML, `${VAR:-default}` interpolation, `--set` overrides, validation.

Every user mistake becomes a ConfigError that names the file and the key path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import ValidationError

from models.errors import ConfigError
from search_spaces import SearchSpace, SpaceError, load_space, problems_from_validation, read_yaml
from studies.config.interpolation import interpolate
from studies.config.samplers import check_sampler_and_pruner
from studies.config.sections import STATIC_METRICS, TASK_METRICS, StudyConfig

if TYPE_CHECKING:
    from models.datasets import Task

T = TypeVar("T")


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with its search space, resolved paths and hashes."""

    config: StudyConfig
    space: SearchSpace
    source: Path
    space_path: Path
    data_path: Path | None
    task: Task

    @property
    def study_name(self) -> str:
        return self.config.study.name or self.source.stem

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.config.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def drop_options_of_replaced_types(data: dict[str, Any], overrides: Sequence[str]) -> None:
    """A file's `sampler.options` / `pruner.options` were written for the file's type (TPE's
    n_startup_trials means nothing to RandomSampler): an override that changes the type drops them,
    in place. Options set by overrides themselves are applied afterwards and stay."""
    for section in ("sampler", "pruner"):
        node = data.get(section)
        new = [a.partition("=")[2] for a in overrides if a.partition("=")[0].strip() == f"{section}.type"]
        if isinstance(node, dict) and new:
            try:
                value = yaml.safe_load(new[-1])
            except yaml.YAMLError:
                value = new[-1]
            if value != node.get("type"):
                node.pop("options", None)


def apply_override(data: dict[str, Any], assignment: str) -> tuple[str, Any]:
    """Apply one `key.path=value` override (value parsed as YAML) in place."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError.single("--set", assignment, "must look like key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError.single("--set", ".".join(parts[: i + 1]), f"no such list index, got {part!r}")
            node = node[int(part)]
        else:
            if not isinstance(node.get(part, {}), (dict, list)):
                raise ConfigError.single("--set", ".".join(parts[: i + 1]), "is not a mapping, cannot set a key inside it")
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError.single("--set", key, f"no such list index, got {last!r}")
        node[int(last)] = value
    else:
        node[last] = value
    return key, value


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def load_config(path: str | Path, overrides: Sequence[str] = (), *, environ: dict[str, str] | None = None) -> LoadedConfig:
    """Read, interpolate, override and validate a study config and its search space."""
    source = Path(path)
    raw = _space_problems(lambda: read_yaml(source, what="config file"))
    if not isinstance(raw, dict):
        raise ConfigError.single(str(source), "", f"must be a mapping of sections, got {type(raw).__name__}")
    drop_options_of_replaced_types(raw, overrides)
    set_keys = [apply_override(raw, a)[0] for a in overrides]
    data = interpolate(raw, str(source), environ=environ)
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as e:
        problems = [(p, _mark_override(p, m, set_keys)) for p, m in problems_from_validation(e)]
        raise ConfigError(str(source), problems) from None
    base = source.parent
    space_path = _resolve(base, config.search_space)
    if not space_path.is_file():
        raise ConfigError.single(str(source), "search_space", f"file not found (relative paths start at {base}/), got {config.search_space!r}")
    space = _space_problems(lambda: load_space(space_path))
    data_path = _resolve(base, config.dataset.path) if config.dataset.path else None
    loaded = LoadedConfig(config, space, source, space_path, data_path, _task(config, source))
    check_consistency(loaded)
    return loaded


def _space_problems(read: Callable[[], T]) -> T:
    """A YAML or space problem found by search_spaces, as the project's ConfigError."""
    try:
        return read()
    except SpaceError as e:
        raise ConfigError(e.source, e.problems) from None


def _mark_override(path: str, message: str, set_keys: list[str]) -> str:
    for key in set_keys:
        if path == key or path.startswith(key + ".") or key.startswith(path + "."):
            return f"{message} (from --set {key})"
    return message


def _task(config: StudyConfig, source: Path) -> Task:
    from models.datasets import BUNDLED

    ds = config.dataset
    if ds.name is not None:
        if ds.name not in BUNDLED:
            raise ConfigError.single(str(source), "dataset.name", f"must be one of {', '.join(sorted(BUNDLED))}, got {ds.name!r}")
        bundled_task = BUNDLED[ds.name].task
        if config.model.task not in (None, bundled_task):
            raise ConfigError.single(str(source), "model.task", f"{ds.name!r} is a {bundled_task} dataset, got {config.model.task!r}")
        return bundled_task
    if config.model.task is None:
        raise ConfigError.single(str(source), "model.task", "required for a file dataset: binary, multiclass or regression")
    return config.model.task


def check_consistency(loaded: LoadedConfig) -> None:
    """Rules that span sections or files: family vs space, metrics vs task, sampler and pruner."""
    from models import FAMILIES

    cfg, src = loaded.config, str(loaded.source)
    family = FAMILIES.get(cfg.model.family)
    if family is None:
        raise ConfigError.single(src, "model.family", f"must be one of {', '.join(sorted(FAMILIES))}, got {cfg.model.family!r}")
    if family.needs_image and cfg.dataset.image_shape is None and not _bundled_image(cfg.dataset.name):
        raise ConfigError.single(src, "model.family", f"{family.name!r} needs image-shaped data: a dataset like digits, or dataset.image_shape")
    gates = loaded.space.conditioning_params()
    unknown = [n for n in loaded.space.params if n not in family.accepted and n not in gates]
    if unknown:
        allowed = ", ".join(sorted(family.accepted))
        raise ConfigError(str(loaded.space_path), [(f"params.{n}", f"not a parameter of model family {family.name!r} (accepted: {allowed})") for n in unknown])
    allowed_metrics = TASK_METRICS[loaded.task] + STATIC_METRICS
    specs = cfg.objective.specs()
    for i, spec in enumerate(specs):
        key = "objective.metric" if cfg.objective.metric is not None else f"objective.metrics.{i}.name"
        if spec.name not in allowed_metrics:
            raise ConfigError.single(src, key, f"must be one of {', '.join(allowed_metrics)} for a {loaded.task} task, got {spec.name!r}")
    if cfg.training.class_weight is not None and loaded.task == "regression":
        raise ConfigError.single(src, "training.class_weight", "applies to classification tasks (binary, multiclass), "
                                 f"got {cfg.training.class_weight!r} for a regression task")
    if not cfg.multi_objective and specs[0].name in STATIC_METRICS:
        raise ConfigError.single(src, "objective.metric", f"{specs[0].name!r} alone needs no training; pair it with a val_* metric in metrics")
    if cfg.engine == "keras_tuner":
        from search_spaces import keras_tuner_problems

        problems = keras_tuner_problems(loaded.space)
        if problems:
            raise ConfigError(str(loaded.space_path), [(p, f"{m} (engine: keras_tuner in {src})") for p, m in problems])
        return

    check_sampler_and_pruner(cfg, src, loaded.space, str(loaded.space_path))


def _bundled_image(name: str | None) -> bool:
    from models.datasets import BUNDLED

    return name is not None and name in BUNDLED and BUNDLED[name].image_shape is not None
