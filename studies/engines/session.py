"""What one invocation of the runner works on: the config, the data, the storage and the study.

Opened once per process (a lone runner, the coordinator of workers, or one worker); the engines
(studies.engines.optuna_loop, studies.engines.keras_tuner) run trials on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.errors import ConfigError
from studies.storage.rdb import open_storage
from studies.storage.study import BUDGET_STATES, open_study, sampler_seed, state_counts

if TYPE_CHECKING:
    import optuna

    from models import Dataset
    from studies.config import LoadedConfig
    from studies.environment import Settings


@dataclass
class Session:
    """What one invocation (a worker, or a coordinator of workers) works on."""

    loaded: LoadedConfig
    settings: Settings
    data: Dataset
    url: str
    storage: optuna.storages.RDBStorage
    study: optuna.Study
    names: list[str]  # the objective's metric names
    target: int  # finished trials the study should hold (budget.n_trials)

    def finished(self) -> int:
        counts = state_counts(self.study)
        return sum(counts[s] for s in BUDGET_STATES)


def load_data(loaded: LoadedConfig) -> Dataset:
    """The study's dataset, split by study.seed; a data problem becomes a ConfigError at dataset.<key>."""
    from models import DatasetError, load_dataset

    ds = loaded.config.dataset
    try:
        return load_dataset(
            name=ds.name, path=loaded.data_path, target=ds.target, features=ds.features, task=loaded.task,
            image_shape=tuple(ds.image_shape) if ds.image_shape else None,
            validation=ds.split.validation, test=ds.split.test, seed=loaded.config.study.seed, columns=ds.columns,
        )
    except DatasetError as e:
        raise ConfigError.single(str(loaded.source), f"dataset.{e.key}".rstrip("."), e.message) from None


def describe_data(data: Dataset) -> list[str]:
    """The column kinds of a mixed-type table and what loading left out (empty for plain arrays)."""
    table = data.spec.table
    lines = [f"data: {len(data.x_train)} train / {len(data.x_val)} validation / {len(data.x_test)} test rows, "
             f"{len(table.feature_names)} columns -> {table.width} model inputs", *table.describe()] if table else []
    return lines + [f"data: {note}" for note in data.notes]


def prepare_tensorflow(settings: Settings) -> None:
    """Import TensorFlow/Keras (quietly unless --verbose) and fix its thread pools before the first
    trial; from then on the collector's full collections leave the libraries alone. Structures
    traced before on this machine are loaded from the project's trace cache (models.trace_cache)."""
    from models import trace_cache
    from models.runtime import freeze_heap, import_tensorflow

    import_tensorflow(settings.tf_threads, quiet=not settings.workbench_verbose)
    trace_cache.configure((settings.workbench_home / "cache" / "traces").resolve() if settings.trace_cache else None,
                          settings.trace_cache_mb * 2**20)
    freeze_heap()


def open_session(loaded: LoadedConfig, settings: Settings, *, storage_flag: str | None, worker_index: int | None,
                 allow_space_change: bool) -> Session:
    """Load the data, open the storage and create or resume the study, with its sampler and pruner."""
    import optuna

    from studies.config.samplers import build_pruner, build_sampler, read_completed_once_per_trial

    cfg = loaded.config
    data = load_data(loaded)
    if worker_index is None:  # once per study command, not once per worker
        for line in describe_data(data):
            print(line)
    url = settings.storage_url(storage_flag, cfg.study.storage)
    # KerasTuner re-runs a trial it lost itself: its studies never queue a stale trial again.
    retries = cfg.budget.retries if cfg.engine == "optuna" else 0
    storage = open_storage(url, heartbeat_interval=settings.heartbeat_seconds, max_retry=retries,
                           curve_seconds=settings.curve_seconds)
    study = open_study(loaded, storage, study_name=loaded.study_name,
                       allow_space_change=allow_space_change, data_hash=data.fingerprint)
    if cfg.engine == "optuna":
        base_seed = cfg.sampler.seed if cfg.sampler.seed is not None else cfg.study.seed
        n_trials = len(study.get_trials(deepcopy=False))
        study.sampler = build_sampler(cfg.sampler, sampler_seed(base_seed, n_trials, worker_index), loaded.space,
                                      str(loaded.space_path), cfg.constraints)
        pruner, priors = build_pruner(cfg.pruner), []
        if cfg.warm_start is not None:
            from studies.engines.priors import for_pruner, with_priors
            from studies.storage.warm_start import warm_start

            name, source_url = cfg.warm_start.source()
            started = warm_start(loaded, study, name=name, url=source_url or url, own_url=url, queue=worker_index is None)
            if started.priors:
                study.sampler = with_priors(study.sampler, started.priors)
                if started.data_hash == data.fingerprint:  # the same data: the same curves to compare
                    priors = for_pruner(pruner, started.priors, minimize=study.direction.name == "MINIMIZE")
        study.pruner = read_completed_once_per_trial(pruner, priors)
    else:  # the tuner picks every value; Optuna only records them
        study.sampler = optuna.samplers.RandomSampler(seed=cfg.study.seed)
        study.pruner = optuna.pruners.NopPruner()
    return Session(loaded, settings, data, url, storage, study, [m.name for m in cfg.objective.specs()], cfg.budget.n_trials)
