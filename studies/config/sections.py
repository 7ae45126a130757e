"""Typed schema of a study config file (what to run); infrastructure comes from the environment."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search_spaces import FieldError

Direction = Literal["minimize", "maximize"]
SamplerType = Literal["tpe", "random", "cmaes", "gp", "qmc", "grid", "nsga2"]
PrunerType = Literal["none", "median", "percentile", "successive_halving", "hyperband", "patient", "threshold"]
EngineType = Literal["optuna", "keras_tuner"]
TunerType = Literal["random", "bayesian", "hyperband"]

# Metrics the objective may name, by task; `val_*` are computed each epoch, so they can prune.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("val_loss", "val_accuracy", "val_auc", "val_pr_auc"),
    "multiclass": ("val_loss", "val_accuracy"),
    "regression": ("val_loss", "val_mae", "val_rmse"),
}
# What the served model will cost, measured on each trial's model right after it is built (the
# forward pass the API uses: models.inference); with n_params, known before training, so they
# cannot prune but can constrain the search (`constraints`) and the registry (`registry.limits`).
SERVING_METRICS = ("latency_p50_ms", "latency_batch64_ms", "model_bytes")
STATIC_METRICS = ("n_params", *SERVING_METRICS)
MAXIMIZED = ("val_accuracy", "val_auc", "val_pr_auc")
# What each metric can reach: a budget.stop target outside it can never stop a study.
BOUNDED = dict.fromkeys(MAXIMIZED, (0.0, 1.0))  # the others lie in [0, inf]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudySection(_Section):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    storage: str | None = None
    seed: int = 0


class SplitSection(_Section):
    validation: float = Field(default=0.2, gt=0, lt=1)
    test: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> SplitSection:
        if self.validation + self.test >= 0.9:
            raise FieldError("test", f"validation + test must be < 0.9 to leave rows to train on, got {self.validation + self.test:g}")
        return self


class DatasetSection(_Section):
    name: str | None = None
    path: str | None = None
    target: str | None = None
    features: list[str] | None = None
    image_shape: list[int] | None = None
    # Column kinds of a file, overriding the inferred ones (models.tabular).
    columns: dict[str, Literal["numeric", "categorical", "boolean", "drop", "id"]] | None = None
    split: SplitSection = SplitSection()

    @model_validator(mode="after")
    def _check(self) -> DatasetSection:
        if (self.name is None) == (self.path is None):
            raise FieldError("name", "give exactly one of name (a bundled dataset) or path (a CSV/Parquet file)")
        if self.path is not None and self.target is None:
            raise FieldError("target", "required key is missing: the target column of the file")
        if self.columns and self.path is None:
            raise FieldError("columns", "column kinds apply to a file dataset (path), not to a bundled one")
        if self.image_shape is not None and (not self.image_shape or min(self.image_shape) < 1):
            raise FieldError("image_shape", f"must be positive sizes like [8, 8, 1], got {self.image_shape}")
        return self


class ModelSection(_Section):
    family: str
    task: Literal["binary", "multiclass", "regression"] | None = None


class MetricSpec(_Section):
    name: str
    direction: Direction | None = None

    def resolved_direction(self) -> Direction:
        if self.direction is not None:
            return self.direction
        return "maximize" if self.name in MAXIMIZED else "minimize"


class ObjectiveSection(_Section):
    metric: str | None = None
    direction: Direction | None = None
    metrics: list[MetricSpec] | None = None

    @model_validator(mode="after")
    def _check(self) -> ObjectiveSection:
        if (self.metric is None) == (self.metrics is None):
            raise FieldError("metric", "give exactly one of metric (single objective) or metrics (a list, multi-objective)")
        if self.metrics is not None:
            if self.direction is not None:
                raise FieldError("direction", "goes inside each entry of metrics")
            if len(self.metrics) < 2:
                raise FieldError("metrics", f"a multi-objective study needs at least 2 metrics, got {len(self.metrics)}")
            names = [m.name for m in self.metrics]
            for i, n in enumerate(names):
                if n in names[:i]:
                    raise FieldError(f"metrics.{i}.name", f"must be unique, got a second {n!r}")
        return self

    def specs(self) -> list[MetricSpec]:
        """The objective metrics in order, each with its direction."""
        if self.metrics is not None:
            return list(self.metrics)
        return [MetricSpec(name=self.metric or "val_loss", direction=self.direction)]


class StopSection(_Section):
    """budget.stop: end the whole study early (every worker) once it has stopped paying off."""

    target: float | None = None  # a value good enough: stop once the best reaches it
    patience: int | None = Field(default=None, ge=1)  # finished trials without an improvement of min_delta
    min_delta: float = Field(default=0.0, ge=0)
    # Stop once a Gaussian process over the finished trials bounds what is left to gain (the
    # regret: best seen minus the lowest lower confidence bound) below this, in objective units.
    regret_bound: float | None = Field(default=None, gt=0)
    min_trials: int = Field(default=10, ge=2)  # COMPLETE trials before the regret bound is judged

    @model_validator(mode="after")
    def _check(self) -> StopSection:
        if self.target is None and self.patience is None and self.regret_bound is None:
            raise FieldError("target", "give at least one of target, patience or regret_bound")
        if self.min_delta and self.patience is None:
            raise FieldError("min_delta", "applies to patience, which is not set")
        return self


class BudgetSection(_Section):
    n_trials: int = Field(default=20, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    max_failed: int | None = Field(default=None, ge=1)
    # A trial that lost its worker (no heartbeat) or failed on a transient error (connection
    # lost) runs again with the same parameters, at most this many times.
    retries: int = Field(default=2, ge=0, le=20)
    stop: StopSection | None = None

    @property
    def failure_limit(self) -> int:
        """Failed trials one invocation tolerates before it stops (max_failed, else n_trials)."""
        return self.max_failed or self.n_trials


class SamplerSection(_Section):
    type: SamplerType = "tpe"
    options: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None


class PrunerSection(_Section):
    type: PrunerType = "median"
    options: dict[str, Any] = Field(default_factory=dict)
    wrapped: PrunerSection | None = None

    @model_validator(mode="after")
    def _check(self) -> PrunerSection:
        if self.wrapped is not None and self.type != "patient":
            raise FieldError("wrapped", f"only the patient pruner wraps another pruner, got type {self.type!r}")
        return self


class _RandomOptions(_Section):
    pass


class _BayesianOptions(_Section):
    num_initial_points: int | None = Field(default=None, ge=1)  # KerasTuner's default: 3 x the number of parameters
    alpha: float = Field(default=1e-4, gt=0)
    beta: float = Field(default=2.6, gt=0)


class _HyperbandOptions(_Section):
    factor: int = Field(default=3, ge=2)
    # null: brackets follow one another until the budget (n_trials / timeout) is spent.
    hyperband_iterations: int | None = Field(default=None, ge=1)


KERAS_TUNER_OPTIONS: dict[str, type[_Section]] = {
    "random": _RandomOptions, "bayesian": _BayesianOptions, "hyperband": _HyperbandOptions,
}


class KerasTunerSection(_Section):
    """engine: keras_tuner: which KerasTuner tuner walks the search space, and its options.
    The budget, epochs (Hyperband's max_epochs), seed and objective come from the other sections."""

    tuner: TunerType = "hyperband"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> KerasTunerSection:
        from pydantic import ValidationError

        model = KERAS_TUNER_OPTIONS[self.tuner]
        try:
            model.model_validate(self.options)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                accepted = ", ".join(model.model_fields) or "none"
                raise FieldError(f"options.{key}", f"not an option of the {self.tuner} tuner (options: {accepted}; "
                                 "max_trials, max_epochs, seed and objective come from budget, training, study and objective)") from None
            raise FieldError(f"options.{key}", f"{err['msg']}, got {err.get('input')!r}") from None
        return self

    def resolved_options(self) -> dict[str, Any]:
        return KERAS_TUNER_OPTIONS[self.tuner].model_validate(self.options).model_dump()


class TrainingSection(_Section):
    epochs: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1)
    early_stopping_patience: int | None = Field(default=5, ge=1)
    # balanced: each class weighs the same in the training loss (imbalanced classes); classification only.
    class_weight: Literal["balanced"] | None = None


class TrackingSection(_Section):
    enabled: bool = True
    experiment: str | None = Field(default=None, min_length=1)  # default: the study name
    log_models: Literal["best", "all", "none"] = "best"
    flush_seconds: float = Field(default=10.0, gt=0)  # how often running trials' epoch metrics are sent


class Limit(_Section):
    min: float | None = None
    max: float | None = None

    def holds(self, value: float | None) -> bool:
        return value is not None and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class WarmStartSection(_Section):
    """warm_start: begin (or extend) this study from another one's trials, even on a changed space."""

    # The source study's name; `name@storage-url` when it lives in another storage.
    from_: str = Field(alias="from", min_length=1)
    storage: str | None = None  # the source's storage (default: this study's)
    top_k: int = Field(default=1, ge=0, le=1000)  # the source's best trials, mapped, run first (storage.warm_start)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def source(self) -> tuple[str, str | None]:
        """(study name, storage URL or None) of the source."""
        name, sep, url = self.from_.partition("@")
        if sep and self.storage is not None:
            raise FieldError("from", f"names a storage after @ and warm_start.storage is set too, got {self.from_!r}")
        if not name:
            raise FieldError("from", f"needs a study name before @, got {self.from_!r}")
        return name, (url or None) if sep else self.storage


class RegistrySection(_Section):
    model_name: str | None = Field(default=None, min_length=1)  # default: the study name
    auto: bool = True  # register the winner at the end of studies.run
    # Multi-objective: the objective that picks the winner among Pareto trials within the limits.
    primary: str | None = None
    limits: dict[str, Limit] = Field(default_factory=dict)


class StudyConfig(_Section):
    """A whole study: data, model, search space, objective, budget, sampler, pruner, training."""

    study: StudySection = StudySection()
    # Who picks the trials: Optuna's sampler and pruner, or a KerasTuner tuner on the same space.
    engine: EngineType = "optuna"
    keras_tuner: KerasTunerSection | None = None
    dataset: DatasetSection
    model: ModelSection
    search_space: str
    objective: ObjectiveSection = ObjectiveSection(metric="val_loss")
    budget: BudgetSection = BudgetSection()
    sampler: SamplerSection = SamplerSection()
    pruner: PrunerSection = PrunerSection()
    training: TrainingSection = TrainingSection()
    tracking: TrackingSection = TrackingSection()
    registry: RegistrySection = RegistrySection()
    # Limits on what each trial's model costs (STATIC_METRICS): the sampler learns to avoid
    # infeasible regions (each trial's `set_constraint`) and the winner must be feasible.
    constraints: dict[str, Limit] = Field(default_factory=dict)
    warm_start: WarmStartSection | None = None

    @model_validator(mode="after")
    def _check_engine(self) -> StudyConfig:
        if self.engine == "optuna":
            if self.keras_tuner is not None:
                raise FieldError("keras_tuner", "only used with engine: keras_tuner (the engine is optuna)")
            return self
        for section in ("sampler", "pruner"):
            if section in self.model_fields_set:
                raise FieldError(section, f"Optuna's {section} is not used with engine: keras_tuner (its tuner picks "
                                 "and stops trials, set keras_tuner.tuner); remove this section or use engine: optuna")
        if self.multi_objective:
            raise FieldError("objective.metrics", "KerasTuner optimises one objective: give objective.metric, or use engine: optuna")
        return self

    @property
    def engine_label(self) -> str:
        """Who picks the trials: `optuna`, or `keras_tuner.<tuner>`."""
        return self.engine if self.engine == "optuna" else f"keras_tuner.{self.tuner.tuner}"

    @property
    def tuner(self) -> KerasTunerSection:
        """The KerasTuner settings (defaults when the section is absent)."""
        return self.keras_tuner or KerasTunerSection()

    @model_validator(mode="after")
    def _check_registry(self) -> StudyConfig:
        if self.registry.auto and self.tracking.enabled and self.tracking.log_models == "none":
            raise FieldError("registry.auto", "registering the winner needs its model: set tracking.log_models "
                             "to best or all, or registry.auto to false")
        names = [m.name for m in self.objective.specs()]
        if self.registry.primary is not None and self.registry.primary not in names:
            raise FieldError("registry.primary", f"must be one of the objective metrics ({', '.join(names)}), got {self.registry.primary!r}")
        for key in self.registry.limits:
            if key not in names and key not in STATIC_METRICS:
                raise FieldError(f"registry.limits.{key}", f"must be an objective metric ({', '.join(names)}) "
                                 f"or one of {', '.join(STATIC_METRICS)}, got {key!r}")
        for section, limits in (("constraints", self.constraints), ("registry.limits", self.registry.limits)):
            for key, limit in limits.items():
                if limit.min is None and limit.max is None:
                    raise FieldError(f"{section}.{key}", "give min, max or both")
                if limit.min is not None and limit.max is not None and limit.min > limit.max:
                    raise FieldError(f"{section}.{key}", f"min must be <= max, got min {limit.min:g} > max {limit.max:g}")
        for key in self.constraints:
            if key not in STATIC_METRICS:
                raise FieldError(f"constraints.{key}", f"must be one of {', '.join(STATIC_METRICS)} (known for every "
                                 f"trial, pruned ones too), got {key!r}")
        return self

    @model_validator(mode="after")
    def _check_search_extras(self) -> StudyConfig:
        stop = self.budget.stop
        if stop is not None and self.multi_objective:
            raise FieldError("budget.stop", "target, patience and regret_bound judge one objective: "
                             "a multi-objective study cannot stop on them")
        if stop is not None and stop.target is not None:
            name = self.objective.specs()[0].name
            low, high = BOUNDED.get(name, (0.0, math.inf))
            if not low <= stop.target <= high:
                raise FieldError("budget.stop.target", f"{name} lies in [{low:g}, {high:g}]: a target outside it "
                                 f"can never stop the study, got {stop.target:g}")
        if stop is not None and self.engine != "optuna":
            raise FieldError("budget.stop", "applies to engine: optuna (KerasTuner's oracle decides when it stops)")
        if stop is not None and stop.min_trials > self.budget.n_trials and stop.regret_bound is not None:
            raise FieldError("budget.stop.min_trials", f"the regret bound is judged after min_trials COMPLETE trials, "
                             f"more than budget.n_trials ({self.budget.n_trials}): it could never stop, got {stop.min_trials}")
        if stop is not None and stop.patience is not None and stop.patience >= self.budget.n_trials:
            raise FieldError("budget.stop.patience", f"must be < budget.n_trials ({self.budget.n_trials}) or it can never "
                             f"stop the study, got {stop.patience}")
        if self.constraints and self.engine != "optuna":
            raise FieldError("constraints", "apply to engine: optuna (its samplers take a constraints function)")
        if self.warm_start is not None:
            if self.engine != "optuna":
                raise FieldError("warm_start", "applies to engine: optuna (KerasTuner's oracle keeps its own history)")
            try:
                self.warm_start.source()
            except FieldError as e:
                raise FieldError(f"warm_start.{e.field}", e.message) from None
        return self

    def constraint_values(self, values: dict[str, float]) -> dict[str, float]:
        """Optuna constraint values (feasible when <= 0) of `constraints`: `<metric>_max` is
        value - max, `<metric>_min` is min - value, for each metric known in `values`."""
        out: dict[str, float] = {}
        for key, limit in self.constraints.items():
            if key in values and limit.max is not None:
                out[f"{key}_max"] = float(values[key]) - limit.max
            if key in values and limit.min is not None:
                out[f"{key}_min"] = limit.min - float(values[key])
        return out

    @property
    def constrains_serving(self) -> bool:
        """Whether a constraint names a serving cost: each trial then measures them before
        training, so a pruned trial tells the sampler whether its region is feasible too."""
        return any(key in SERVING_METRICS for key in self.constraints)

    def eligible(self, values: dict[str, float | None]) -> bool:
        """Whether a trial with these metrics (objective values and user attributes by name) may
        win: within `constraints` and `registry.limits`."""
        return all(limit.holds(values.get(k)) for k, limit in (*self.constraints.items(), *self.registry.limits.items()))

    @property
    def directions(self) -> list[Direction]:
        return [m.resolved_direction() for m in self.objective.specs()]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective.specs()) > 1
