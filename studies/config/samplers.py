"""Samplers and pruners from the config, with options checked against Optuna's own signatures."""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from models.errors import ConfigError
from search_spaces import FieldError, grid_values

if TYPE_CHECKING:
    import optuna

    from search_spaces import SearchSpace
    from studies.config.sections import Limit, PrunerSection, SamplerSection, StudyConfig

SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
    "grid": "GridSampler",
    "nsga2": "NSGAIISampler",
}
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "patient": "PatientPruner",
    "threshold": "ThresholdPruner",
}
SINGLE_OBJECTIVE_ONLY = {"cmaes"}
# Options the workbench sets itself; a config may not pass them.
_RESERVED = {"seed", "search_space", "wrapped_pruner"}
# Options that take Python callables or objects: not expressible in YAML.
_CALLABLE = {"gamma", "weights", "constraints_func", "independent_sampler", "mutation", "crossover",
             "elite_population_selection_strategy", "child_generation_strategy", "after_trial_strategy", "source_trials"}


def _construct(cls: type, options: dict[str, Any], path: str, **fixed: Any) -> Any:
    accepted = [
        n for n, p in inspect.signature(cls).parameters.items()
        if n not in _RESERVED and n not in _CALLABLE and p.kind is not p.VAR_KEYWORD
    ]
    for key in options:
        if key not in accepted:
            raise FieldError(f"{path}.options.{key}", f"not an option of {cls.__name__} (options: {', '.join(accepted) or 'none'})")
    params = inspect.signature(cls).parameters
    options = {key: _coerce(cls, key, params[key].annotation, value, path) for key, value in options.items()}
    try:
        return cls(**options, **fixed)
    except (TypeError, ValueError) as e:
        raise FieldError(f"{path}.options", f"{cls.__name__} rejected these options: {e}") from None


def _coerce(cls: type, key: str, annotation: Any, value: Any, path: str) -> Any:
    """Check an option against its annotation where that is a plain type (int, float | None, ...)."""
    from pydantic import TypeAdapter, ValidationError

    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, {"Literal": Literal})  # noqa: S307 - Optuna's own annotations
        except Exception:
            return value  # an annotation naming Optuna-internal types: let the constructor judge
    if annotation is inspect.Parameter.empty:
        return value
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as e:
        detail = e.errors()[0]["msg"]
        wanted = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        raise FieldError(f"{path}.options.{key}", f"{cls.__name__}({key}=...) needs {wanted}: {detail}, got {value!r}") from None
    except Exception:
        return value


def takes_constraints(sampler_type: str) -> bool:
    """Whether the sampler steers around infeasible trials (Optuna 5: the constraints a trial
    sets with `set_constraint`; its samplers that do are the ones that took a constraints_func)."""
    import optuna

    return "constraints_func" in inspect.signature(getattr(optuna.samplers, SAMPLERS[sampler_type])).parameters


def build_sampler(section: SamplerSection, seed: int, space: SearchSpace, space_source: str,
                  constraints: dict[str, Limit] | None = None) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded; grid search gets its grid from the search space (read from
    `space_source`). With `constraints` (set on each trial by the objective) it must heed them."""
    import optuna

    if section.type == "gp":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise FieldError("sampler.type", "the gp sampler needs PyTorch: pip install torch") from None
    if section.type == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise FieldError("sampler.type", "the cmaes sampler needs the cmaes package: pip install cmaes") from None
    cls = getattr(optuna.samplers, SAMPLERS[section.type])
    fixed: dict[str, Any] = {"seed": seed}
    if constraints:
        if not takes_constraints(section.type):
            usable = ", ".join(t for t in SAMPLERS if takes_constraints(t))
            raise FieldError("constraints", f"the {section.type} sampler cannot steer around constraints: use one of {usable}")
    if section.type == "grid":
        try:
            fixed["search_space"] = grid_values(space)
        except FieldError as e:
            raise ConfigError.single(space_source, e.field, e.message) from None
    options = dict(section.options)
    if section.type == "tpe":
        # Parallel workers: a running trial counts as a bad result while it runs, so workers do
        # not all sample the same region. No effect on a single worker's choices.
        options.setdefault("constant_liar", True)
        cls = _snapshot_tpe_class()
    return _construct(cls, options, "sampler", **fixed)


@functools.cache
def _snapshot_tpe_class() -> type:
    import optuna

    from studies.config import tpe_kernels

    tpe_kernels.install()

    class TPESampler(optuna.samplers.TPESampler):
        """Optuna's TPE sampler, reading the study's trials once per trial. With `constant_liar`
        Optuna's TPE reads every trial again for each group of parameters it samples (it cannot use
        its per-trial cache, which leaves out running trials): on an RDB storage each read also
        reloads the running trials with their params and attributes, ~2.8 ms on SQLite, five or
        six times a trial of the MLP space. Here the search-space inference and every sampling of
        one trial see one snapshot of the trials, taken when the first of them asks; the same
        choices for a single worker (tests/unit/test_samplers.py), and for parallel workers the
        view Optuna's own cache gives without the liar."""

        def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
            return super().infer_relative_search_space(self._snapshot(study, trial), trial)

        def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                            search_space: dict[str, Any]) -> dict[str, Any]:
            return super().sample_relative(self._snapshot(study, trial), trial, search_space)

        def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                               param_distribution: Any) -> Any:
            return super().sample_independent(self._snapshot(study, trial), trial, param_name, param_distribution)

        def _snapshot(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Any:
            # One per thread (n_jobs > 1), in a plain dict: the sampler still deep-copies.
            snapshots = self.__dict__.setdefault("_snapshots", {})
            key = (id(study._storage), study._study_id, trial._trial_id)
            held = snapshots.get(threading.get_ident())
            if held is None or held[0] != key:
                held = snapshots[threading.get_ident()] = (key, study._get_trials(deepcopy=False, states=None, use_cache=False))
            return _Snapshot(held[1], study)

    return TPESampler


class _Snapshot:
    """A study whose trial queries are answered from a list of its trials read before; everything
    else is the study's."""

    def __init__(self, trials: list[optuna.trial.FrozenTrial], study: optuna.Study) -> None:
        self._trials, self._study = trials, study

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list:
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list:
        return self._get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def build_pruner(section: PrunerSection, path: str = "pruner") -> optuna.pruners.BasePruner:
    """The configured pruner; `patient` wraps the pruner given under `wrapped` (or none)."""
    import optuna

    cls = getattr(optuna.pruners, PRUNERS[section.type])
    if section.type == "patient":
        inner = build_pruner(section.wrapped, f"{path}.wrapped") if section.wrapped else None
        if "patience" not in section.options:
            raise FieldError(f"{path}.options.patience", "required key is missing: epochs without improvement before pruning")
        return _construct(cls, section.options, path, wrapped_pruner=inner)
    return _construct(cls, section.options, path)


def check_sampler_and_pruner(cfg: StudyConfig, src: str, space: SearchSpace, space_source: str) -> None:
    """Build both once at load time so that a bad option fails before any data is read."""
    try:
        if cfg.multi_objective and cfg.sampler.type in SINGLE_OBJECTIVE_ONLY:
            raise FieldError("sampler.type", f"{cfg.sampler.type!r} handles a single objective only; use tpe, nsga2, random, gp or qmc")
        if cfg.multi_objective and cfg.pruner.type != "none":
            raise FieldError("pruner.type", f"Optuna cannot prune multi-objective studies: use none, got {cfg.pruner.type!r}")
        build_sampler(cfg.sampler, 0, space, space_source, cfg.constraints)
        build_pruner(cfg.pruner)
    except FieldError as e:
        raise ConfigError.single(src, e.field, e.message) from None


def read_completed_once_per_trial(inner: optuna.pruners.BasePruner,
                                  priors: Sequence[optuna.trial.FrozenTrial] = ()) -> optuna.pruners.BasePruner:
    """Wrap a pruner so the completed trials it reads are fetched once per trial, not at every
    epoch. Optuna's pruners call `study.get_trials(states=(COMPLETE,))` in each `should_prune`;
    on an RDB storage each such call also re-reads the running trial with all its params and
    intermediate values: a quarter of a short trial's storage time (benchmarks/storage_overhead.py).
    Within one trial the pruner sees the trials that were complete at its first report; calls
    with other arguments reach the study as before. The running trial's own system attributes
    (where successive halving and Hyperband keep the rungs it passed; Optuna reloads the whole
    trial from the storage to read them at every report, ~1.8 ms on SQLite) are read at its first
    report and then kept up to date from the pruner's own writes: only this worker writes them.
    Decisions are unchanged for a single worker (tests/unit/test_pruning.py). `priors` are finished
    trials from outside the study that the pruner compares a trial against too, as if they were
    the study's (a warm start's, as studies.engines.priors.for_pruner gives them)."""
    return _once_per_trial_class()(inner, priors)


@functools.cache
def _once_per_trial_class() -> type:
    import optuna

    class CompletedTrialsOncePerTrial(optuna.pruners.BasePruner):
        def __init__(self, inner: optuna.pruners.BasePruner, priors: Sequence[optuna.trial.FrozenTrial] = ()) -> None:
            self.inner = inner
            self.priors = list(priors)
            self._key: tuple[int, int] | None = None
            self._view: _StudyView | None = None

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            key = (id(study), trial.number)
            if key != self._key or self._view is None:
                self._key, self._view = key, _StudyView(study, trial._trial_id, dict(trial.system_attrs), self.priors)
            trial = copy.copy(trial)
            trial.system_attrs = self._view.own_attrs
            # a duck-typed stand-in for the Study: optuna's pruners only query it
            return self.inner.prune(self._view, trial)  # type: ignore[arg-type]

        def __repr__(self) -> str:
            return f"CompletedTrialsOncePerTrial({self.inner!r})"

    return CompletedTrialsOncePerTrial


class _StudyView:
    """A study whose finished-trial queries (deepcopy=False) are answered from one snapshot, whose
    storage keeps `own_attrs`, the running trial's system attributes, up to date, and whose
    queries (deepcopy=False) list `priors` first."""

    def __init__(self, study: optuna.Study, trial_id: int, own_attrs: dict[str, Any],
                 priors: Sequence[optuna.trial.FrozenTrial] = ()) -> None:
        self._study = study
        self._snapshots: dict[tuple, list] = {}
        self.own_attrs = own_attrs
        self._storage = _OwnAttrsStorage(study._storage, trial_id, own_attrs)
        self._priors = list(priors)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list:
        if deepcopy:
            return self._study.get_trials(deepcopy=deepcopy, states=states)
        priors = [t for t in self._priors if states is None or t.state in states]
        if states is None or not all(s.is_finished() for s in states):
            return [*priors, *self._study.get_trials(deepcopy=False, states=states)]
        key = tuple(states)
        if key not in self._snapshots:
            self._snapshots[key] = [*priors, *self._study.get_trials(deepcopy=False, states=states)]
        return self._snapshots[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class _OwnAttrsStorage:
    """A storage that also records the system attributes it writes on one trial in `attrs`."""

    def __init__(self, storage: Any, trial_id: int, attrs: dict[str, Any]) -> None:
        self._storage, self._trial_id, self._attrs = storage, trial_id, attrs

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._storage.set_trial_system_attr(trial_id, key, value)
        if trial_id == self._trial_id:
            self._attrs[key] = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)
