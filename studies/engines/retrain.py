"""Retrain one finished trial alone, from what the study stored: its parameters, its seed (a
function of the study seed and the trial number) and the config's data split. Nothing is logged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.errors import WorkbenchError
from studies.config import load_config
from studies.engines.objective import Objective
from studies.engines.session import load_data, prepare_tensorflow
from studies.storage.study import derive_seed

if TYPE_CHECKING:
    import optuna

    from studies.config import LoadedConfig
    from studies.environment import Settings


class NoSuchTrial(WorkbenchError):
    """The study has no trial with that number, or it has no parameters to replay."""


@dataclass(frozen=True)
class Retrained:
    stored: optuna.trial.FrozenTrial
    seed: int
    epochs: int | None  # a PRUNED trial is replayed for the epochs it ran
    curve: dict[int, float]  # epoch -> the replayed objective value
    attrs: dict[str, Any]  # what the trial stored, as the replay computed it (val_*, test_*, ...)


def retrain(loaded: LoadedConfig, study: optuna.Study, number: int, settings: Settings,
            overrides: list[str] | None = None) -> Retrained:
    """Train trial `number` of `study` again with its parameters and seed."""
    from search_spaces import from_flat

    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise NoSuchTrial(f"study {study.study_name!r} has no trial {number} (it has {len(trials)})")
    stored = trials[number]
    if not stored.params:
        raise NoSuchTrial(f"trial {number} has no parameters ({stored.state.name})")
    seed = derive_seed(loaded.config.study.seed, stored.number)
    params = from_flat(loaded.space, stored.params)
    epochs = stored.user_attrs.get("epochs_run") if stored.state.name == "PRUNED" else None
    if epochs:
        loaded = load_config(str(loaded.source), [*(overrides or []), f"training.epochs={int(epochs)}"])
    data = load_data(loaded)
    prepare_tensorflow(settings)
    replayed = Objective(loaded, data).replay(stored.params, params, seed, number=stored.number)
    return Retrained(stored, seed, int(epochs) if epochs else None, replayed.curve, replayed.attrs)
