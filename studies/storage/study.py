"""Creating or resuming a study: its search space is pinned by hash, its budget counts finished trials."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import ConfigError

if TYPE_CHECKING:
    import optuna

    from studies.config import LoadedConfig
    from studies.environment import Settings

SPACE_HASH = "workbench:space_hash"
SPACE = "workbench:space"
CONFIG = "workbench:config"
DATA_HASH = "workbench:data_hash"
ENGINE = "workbench:engine"  # optuna or keras_tuner: who picked the trials
# budget.stop ended the study: {"reason", "finished", "n_trials", "at"} (studies.engines.stopping);
# {"since", "after"} once a later run continued past it.
STOPPED_ATTR = "workbench:stopped"
# Where the study started from: source study, storage, space hashes, trials mapped/dropped/queued
# (studies.storage.warm_start).
WARM_START_ATTR = "workbench:warm_start"
# On a trial a warm start queued: the source trial it re-runs ("study#number"; never pruned) and
# that trial's seed (studies.engines.objective).
WARM_START_OF = "warm_start_of"
WARM_START_SEED = "warm_start_seed"
# The budget counts these: a failed trial is retried, it does not use up the budget.
BUDGET_STATES = ("COMPLETE", "PRUNED")


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that depends on every part (e.g. study seed and trial number)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def sampler_seed(base: int, n_trials: int, worker: int | None) -> int:
    """The sampler's seed for one worker: the study seed itself for a fresh single-worker study
    (reproducible), otherwise mixed with the study's size, the worker index and the host, so a
    resumed study and parallel workers (here or on other machines) do not replay the same draws."""
    import socket
    import zlib

    if n_trials == 0 and worker is None:
        return base
    return derive_seed(base, n_trials, -1 if worker is None else worker, zlib.crc32(socket.gethostname().encode()))


def stopped_record(study: optuna.Study) -> dict[str, Any] | None:
    """The record of the study's study-level stop, if it is stopped."""
    record = study.user_attrs.get(STOPPED_ATTR)
    return record if isinstance(record, dict) and record.get("reason") else None


def state_counts(study: optuna.Study) -> Counter[str]:
    """How many trials are in each state (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def open_study(
    loaded: LoadedConfig,
    storage: optuna.storages.BaseStorage,
    *,
    study_name: str,
    allow_space_change: bool = False,
    data_hash: str | None = None,
) -> optuna.Study:
    """Create the study, or load it if it exists; refuse a different search space or objective."""
    import optuna

    cfg = loaded.config
    study = optuna.create_study(
        storage=storage, study_name=study_name, directions=cfg.directions, load_if_exists=True
    )
    src = str(loaded.source)
    existing = [d.name.lower() for d in study.directions]
    if existing != list(cfg.directions):
        raise ConfigError.single(
            src, "objective", f"study {study_name!r} was created with directions {existing}, this config asks {list(cfg.directions)}"
        )
    attrs = study.user_attrs
    new_hash = loaded.space.fingerprint()
    old_hash = attrs.get(SPACE_HASH)
    if old_hash is not None and old_hash != new_hash and not allow_space_change:
        raise ConfigError.single(
            src,
            "search_space",
            f"study {study_name!r} was run with another search space (hash {old_hash}, now {new_hash}); "
            "pass --allow-space-change to continue it anyway, or give a new --study-name",
        )
    engine = cfg.engine_label
    old_engine = attrs.get(ENGINE)
    if old_engine is not None and old_engine != engine:
        raise ConfigError.single(
            src, "engine", f"study {study_name!r} was run with {old_engine}, this config asks {engine}: one study "
            "holds one engine's trials (compare them with studies.compare); give a new --study-name"
        )
    updates: dict[str, Any] = {
        SPACE_HASH: new_hash,
        SPACE: loaded.space.model_dump(mode="json", exclude_none=True),
        CONFIG: cfg.model_dump(mode="json"),
        ENGINE: engine,
    }
    if data_hash is not None:
        updates[DATA_HASH] = data_hash
    for key, value in updates.items():
        if attrs.get(key) != value:
            study.set_user_attr(key, value)
    names = [m.name for m in cfg.objective.specs()]
    if study.metric_names != names:
        study.set_metric_names(names)
    return study


def trial_metrics(trial: optuna.trial.FrozenTrial, names: list[str]) -> dict[str, float | None]:
    """A finished trial's user attributes and objective values by name."""
    out = {k: v for k, v in trial.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out | dict(zip(names, trial.values or (), strict=False))


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Within the study's `constraints` (what the objective set with `set_constraint`: all <= 0)."""
    return all(c <= 0 for c in trial.constraints.values())


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best feasible COMPLETE trial of a single-objective study, or None."""
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial, or none feasible
        return None


def improves(study: optuna.Study, values: float | tuple[float, ...],
             eligible: Callable[[optuna.trial.FrozenTrial], bool] | None = None) -> bool:
    """Whether these values beat every COMPLETE trial so far (single objective), or are not
    dominated by any of them (multi-objective): the trials whose model is worth keeping.
    `eligible`: only trials that may win count (within constraints and registry limits).
    Reads the completed trials from the study's cache (no best-trial query per trial)."""
    import optuna

    vals = (values,) if isinstance(values, (int, float)) else tuple(values)
    signs = [1.0 if d.name == "MINIMIZE" else -1.0 for d in study.directions]
    mine = [s * v for s, v in zip(signs, vals, strict=True)]
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if trial.values is None or (eligible is not None and not eligible(trial)):
            continue
        theirs = [s * v for s, v in zip(signs, trial.values, strict=True)]
        if len(vals) == 1:
            if theirs[0] <= mine[0]:
                return False
        elif all(t <= m for t, m in zip(theirs, mine, strict=True)) and any(t < m for t, m in zip(theirs, mine, strict=True)):
            return False
    return True


def reclaim(study: optuna.Study, storage: Any, *, dead_workers: Collection[str] = frozenset(), requeue: bool = True) -> None:
    """Fail trials whose worker is gone and run the storage's stale-trial callback on them
    (queue a retry, close the MLflow run). Stale by heartbeat, or RUNNING on a worker known dead
    (host:pid in `dead_workers`: no need to wait for its heartbeat to expire). Without `requeue`
    (the budget is already met) the trials are failed and their runs closed, nothing is queued."""
    import copy
    import warnings

    import optuna

    if requeue:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    if not dead_workers:
        return
    handler = storage.get_heartbeat_stale_trial_callback()
    notify = handler if requeue else getattr(handler, "on_stale", None)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") not in dead_workers:
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if notify is not None:
            notify(study, copy.deepcopy(storage.get_trial(trial._trial_id)))


def load_existing(loaded: LoadedConfig, storage_flag: str | None, settings: Settings) -> optuna.Study:
    """The config's study from the storage (same precedence as the runner), for tools that read
    a finished study (select, replay); a missing study is a StorageError naming it."""
    import optuna

    from studies.storage.rdb import StorageError, open_storage, redact

    url = settings.storage_url(storage_flag, loaded.config.study.storage)
    try:
        return optuna.load_study(study_name=loaded.study_name, storage=open_storage(url))
    except KeyError:
        raise StorageError(f"no study named {loaded.study_name!r} in {redact(url)}") from None
