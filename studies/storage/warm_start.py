"""Warm start (`warm_start:` / `--warm-start-from`): a study begins from another study's trials,
even when the search space changed.

The source's finished trials are carried into the new space (search_spaces.transfer): values
still valid are kept, values out of a new range are left out, removed parameters and choices are
left out, new parameters are sampled. Those trials inform the sampler as prior observations
(studies.engines.priors): they are not in the study, so they never count towards the budget,
the winner or the reports. The best `top_k` (default 1) are queued as real trials first, their
values clipped into the new ranges and their seeds kept (on the same data a source's best is its
best again, instead of a fresh draw of initial weights that may land anywhere), and never pruned
(studies.engines.objective): the pruner's bar, set by all the source's trials at once, is
stricter than the one such a trial passed in its own study. One is the default: on the same data
a queued trial re-runs a result the sampler already holds as a prior, a trial of the budget
spent on no news (benchmarks/warm_start.py, 20 seeds: 0.88x a cold start's trials with 5
queued, 0.44x with 1); with new data, more of them re-test the source's best on it. The lineage
is recorded on the study (WARM_START_ATTR) and the tracker copies it onto the MLflow parent run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import ConfigError
from search_spaces import compile_space, transfer
from studies.storage.study import DATA_HASH, ENGINE, SPACE_HASH, WARM_START_ATTR, WARM_START_OF, WARM_START_SEED

if TYPE_CHECKING:
    import optuna

    from studies.config import LoadedConfig

KEY = "warm_start.from"


@dataclass(frozen=True)
class WarmStart:
    priors: list[optuna.trial.FrozenTrial]  # the source's finished trials in the new space
    lineage: dict[str, Any]
    data_hash: str | None = None  # the data the source trained on (studies.storage.study.DATA_HASH)


def _source_study(loaded: LoadedConfig, name: str, url: str, own_url: str) -> optuna.Study:
    import optuna
    from sqlalchemy.engine import make_url

    from studies.storage.rdb import StorageError, open_storage, redact

    src = str(loaded.source)
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError.single(src, KEY, f"the storage after @ is not a SQLAlchemy URL, got {url!r}") from None
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not Path(db).is_file():
        raise ConfigError.single(src, KEY, f"no SQLite storage at {db} (the source study's storage), got {url!r}")
    try:
        storage = open_storage(url)
    except StorageError as e:
        raise ConfigError.single(src, KEY, f"cannot open the source's storage: {e}") from None
    if name == loaded.study_name and url == own_url:
        raise ConfigError.single(src, KEY, f"is this study itself; name another study, got {name!r}")
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        listed = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "none"
        raise ConfigError.single(src, KEY, f"no study named {name!r} in {redact(url)} (studies there: {listed}), got {name!r}") from None


def _check_compatible(loaded: LoadedConfig, source: optuna.Study) -> None:
    cfg, src = loaded.config, str(loaded.source)
    engine = source.user_attrs.get(ENGINE, "optuna")
    if engine != "optuna":
        raise ConfigError.single(src, KEY, f"study {source.study_name!r} was run by {engine}; warm start reads "
                                 "trials an Optuna sampler chose (engine: optuna), got an engine mismatch")
    theirs = [d.name.lower() for d in source.directions]
    names = [m.name for m in cfg.objective.specs()]
    their_names = source.metric_names or ["(unnamed)"] * len(theirs)
    if theirs != list(cfg.directions) or their_names != names:
        mine = ", ".join(f"{n} ({d})" for n, d in zip(names, cfg.directions, strict=True))
        other = ", ".join(f"{n} ({d})" for n, d in zip(their_names, theirs, strict=True))
        raise ConfigError.single(src, KEY, f"must optimise the same objective as this study ({mine}), "
                                 f"got study {source.study_name!r} with {other}")


def _prior(trial: optuna.trial.FrozenTrial, params: dict[str, Any], target: dict[str, Any], number: int) -> optuna.trial.FrozenTrial:
    import optuna

    prior = optuna.trial.create_trial(
        state=trial.state, params=params, distributions={k: target[k] for k in params},
        values=trial.values if trial.state.name == "COMPLETE" else None,
        intermediate_values=dict(trial.intermediate_values),
        user_attrs={"workbench:prior_of": trial.number},
    )
    prior.number = -1 - number  # never a trial number of this study
    return prior


def warm_start(loaded: LoadedConfig, study: optuna.Study, *, name: str, url: str, own_url: str, queue: bool) -> WarmStart:
    """Map the source's finished trials into this study's space; with `queue` (once per study
    command, not per worker) queue the best top_k the first time this source is used."""
    import optuna

    from studies.storage.rdb import redact

    assert loaded.config.warm_start is not None
    top_k = loaded.config.warm_start.top_k
    source = _source_study(loaded, name, url, own_url)
    _check_compatible(loaded, source)
    target = compile_space(loaded.space)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = source.get_trials(deepcopy=False, states=states)
    priors: list[optuna.trial.FrozenTrial] = []
    clipped = dropped = empty = 0
    for trial in finished:
        moved = transfer(trial.params, target, clip=False)
        dropped += len(moved.dropped)
        if not moved.params:
            empty += 1
            continue
        priors.append(_prior(trial, moved.params, target, len(priors)))
    lineage: dict[str, Any] = {
        "source": source.study_name, "storage": redact(url), "source_space_hash": source.user_attrs.get(SPACE_HASH),
        "space_hash": loaded.space.fingerprint(), "source_trials": len(finished), "priors": len(priors),
        "trials_dropped": empty, "values_dropped": dropped,
    }
    previous = study.user_attrs.get(WARM_START_ATTR)
    if queue and not (isinstance(previous, dict) and previous.get("source") == lineage["source"]
                      and previous.get("storage") == lineage["storage"]):
        sign = 1.0 if source.directions[0].name == "MINIMIZE" else -1.0
        complete = [t for t in finished if t.state.name == "COMPLETE" and t.values]
        best = sorted(complete, key=lambda t: (sign * t.values[0], t.number))[:top_k]
        for trial in best:
            moved = transfer(trial.params, target, clip=True)
            clipped += len(moved.clipped)
            attrs: dict[str, Any] = {WARM_START_OF: f"{source.study_name}#{trial.number}"}
            if isinstance(trial.user_attrs.get("seed"), int):  # same data: the same result again
                attrs[WARM_START_SEED] = trial.user_attrs["seed"]
            study.enqueue_trial(moved.params, user_attrs=attrs, skip_if_exists=True)
        lineage |= {"queued": len(best), "values_clipped": clipped,
                    "at": datetime.now(UTC).isoformat(timespec="seconds")}
        study.set_user_attr(WARM_START_ATTR, lineage)
        changed = "same space" if lineage["source_space_hash"] == lineage["space_hash"] else "space changed"
        print(f"warm start: {len(priors)} of {len(finished)} finished trials of {source.study_name!r} ({changed}: "
              f"{dropped} values left out, {clipped} clipped) inform the sampler; its best {len(best)} run first",
              file=sys.stderr)
    elif isinstance(previous, dict):
        lineage = previous
    return WarmStart(priors, lineage, source.user_attrs.get(DATA_HASH))
