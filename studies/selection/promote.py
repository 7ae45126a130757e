"""Promotion: register a study's winning model and move the registry aliases.

The winner (best trial, or a Pareto trial chosen by `registry.primary` within `registry.limits`)
is evaluated again on the held-out test split from its logged model, registered as a version of
`registry.model_name` (once per run: selecting twice creates no second version), and becomes
`@champion` if it beats the current champion's test metric, else `@challenger`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.store import Store
from studies.selection.registry import Registry, RegistryError
from studies.selection.winner import alias_for, criterion, pick_winner
from studies.tracking.names import RUN_ID_ATTR

if TYPE_CHECKING:
    import optuna

    from models import Dataset
    from serving.settings import MlflowLocation
    from studies.config import LoadedConfig


@dataclass(frozen=True)
class Selection:
    model_name: str
    version: str
    alias: str
    created: bool
    trial_number: int
    metric: str
    value: float
    previous_champion: str | None

    def describe(self) -> str:
        made = "registered as" if self.created else "already registered as"
        return (f"trial {self.trial_number} {made} {self.model_name} v{self.version}: {self.metric} = {self.value:.5g}; "
                f"alias @{self.alias}" + (f" (was v{self.previous_champion})" if self.previous_champion else ""))


def select(loaded: LoadedConfig, study: optuna.Study, data: Dataset, location: MlflowLocation, *,
           force: bool = False) -> Selection:
    """Pick, evaluate, register and alias the winner of a study."""
    from models.training import evaluate

    cfg = loaded.config
    name = cfg.registry.model_name or study.study_name
    rule = criterion(cfg)
    winner = pick_winner(study, cfg)
    run_id = winner.user_attrs.get(RUN_ID_ATTR)
    registry = Registry(Store.at(location))
    if not run_id or not registry.has_model(run_id):
        raise RegistryError(f"trial {winner.number} has no model logged in MLflow at {registry.tracking_uri} "
                            "(was tracking off, or tracking.log_models none?)")
    model = registry.load_keras(run_id)
    metrics = {f"test_{k}": v for k, v in evaluate(model, data.x_test, data.y_test).items()}
    metrics["n_params"] = float(model.count_params())
    value = metrics[rule.metric]
    tags = {
        "workbench.study": study.study_name,
        "workbench.trial_number": str(winner.number),
        "workbench.params": json.dumps(winner.params, sort_keys=True),
        "workbench.data_hash": data.fingerprint,
        "workbench.compare_metric": rule.metric,
        "workbench.compare_value": repr(value),
        **{f"workbench.{k}": repr(v) for k, v in metrics.items()},
    }
    description = (f"Trial {winner.number} of study {study.study_name!r}: {rule.metric} = {value:.6g} on the test split; "
                   f"params {json.dumps(winner.params, sort_keys=True)}")
    version, created = registry.register(name, run_id, tags=tags, description=description)
    champion = registry.by_alias(name, "champion")
    number = str(version.version)
    if champion is not None and str(champion.version) == number:
        return Selection(name, number, "champion", created, winner.number, rule.metric, value, None)
    champion_value = float(champion.tags["workbench.compare_value"]) if champion is not None and "workbench.compare_value" in champion.tags else None
    alias = alias_for(value, champion_value, rule, force=force)
    previous = None
    if alias == "champion":
        why = "forced" if force and champion_value is not None and not rule.better(value, champion_value) else (
            "first champion" if champion is None else f"beats v{champion.version} ({rule.metric} {champion_value:.6g})")
        previous = registry.make_champion(name, number, reason=f"study {study.study_name} trial {winner.number}: {why}")
    else:
        assert champion is not None  # alias_for gives challenger only against a champion's value
        registry.make_challenger(name, number,
                                 reason=f"does not beat v{champion.version} ({rule.metric} {champion_value:.6g})")
    return Selection(name, number, alias, created, winner.number, rule.metric, value, previous)
