"""Promotion: register a study's winning model and move the registry aliases.

The winner (best trial, or a Pareto trial chosen by `registry.primary` within `registry.limits`)
is evaluated again on the held-out test split from its logged model, registered as a version of
`registry.model_name` (once per run: selecting twice creates no second version), and becomes
`@champion` if it beats the current champion's test metric, else `@challenger`. A challenger is
promoted later on evidence from live traffic (serving.shadow) or a better test metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serving.store import Store
from studies.selection.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from studies.selection.winner import Criterion, NoWinner, alias_for, criterion, rank_winners
from studies.tracking.names import RUN_ID_ATTR

if TYPE_CHECKING:
    from collections.abc import Callable

    import optuna

    from models import Dataset
    from serving.settings import MlflowLocation
    from serving.shadow import Evidence
    from studies.config import LoadedConfig
    from studies.config.sections import StudyConfig


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
    passed_over: tuple[str, ...] = ()  # better candidates whose serving costs, measured again, broke a limit

    def describe(self) -> str:
        made = "registered as" if self.created else "already registered as"
        return (f"trial {self.trial_number} {made} {self.model_name} v{self.version}: {self.metric} = {self.value:.5g}; "
                f"alias @{self.alias}" + (f" (was v{self.previous_champion})" if self.previous_champion else "")
                + "".join(f"; passed over {why}" for why in self.passed_over))


def select(loaded: LoadedConfig, study: optuna.Study, data: Callable[[], Dataset], location: MlflowLocation, *,
           force: bool = False) -> Selection:
    """Pick, evaluate, register and alias the winner of a study.

    `data` gives the dataset (and readies Keras) only when the winner must be evaluated: a
    winner registered before keeps the test metric recorded on its version, so selecting again
    loads neither the data nor TensorFlow."""
    cfg = loaded.config
    name = cfg.registry.model_name or study.study_name
    rule = criterion(cfg)
    registry = Registry(Store.at(location))
    winner, version, created, value, passed_over = _register_winner(study, cfg, registry, name, rule, data)
    champion = registry.by_alias(name, "champion")
    number = str(version.version)
    if champion is not None and str(champion.version) == number:
        return Selection(name, number, "champion", created, winner.number, rule.metric, value, None, passed_over)
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
    return Selection(name, number, alias, created, winner.number, rule.metric, value, previous, passed_over)


MAX_CONFIRMED = 3  # candidates measured again before the selector gives up
MAX_CANDIDATES = 10  # candidates looked at (each costs a request or two to the tracking server)
CONFIRM_BURSTS = 7  # ~0.5 s once per registration (serving.probe.ServingProbe.confirm)


def _register_winner(study: optuna.Study, cfg: StudyConfig, registry: Registry, name: str, rule: Criterion,
                     data: Callable[[], Dataset]) -> tuple[optuna.trial.FrozenTrial, Any, bool, float, tuple[str, ...]]:
    """The best candidate's version (registered now, or before): its trial, the version, whether
    it was created now, its test metric, and the better candidates passed over.

    A candidate is evaluated on the test split and its serving costs measured again over several
    bursts (serving.probe.ServingProbe.confirm); the version records them (tags
    workbench.latency_p50_ms, workbench.latency_batch64_ms, workbench.model_bytes). Where
    `registry.limits` or `constraints` name a serving cost, it must hold measured again too: a
    candidate the trial's single burst put within a limit by luck is passed over for the next (at
    most MAX_CONFIRMED are measured). What was measured is kept on the candidate's run
    (Registry.record_serving_costs), so a later selection passes over the same trial without
    measuring it again, and a version registered before is found without evaluating anything."""
    ranked = rank_winners(study, cfg)
    refused: list[str] = []
    measured = without_model = 0
    dataset: Dataset | None = None
    for winner in ranked[:MAX_CANDIDATES]:
        run_id = winner.user_attrs.get(RUN_ID_ATTR)
        if not run_id or not registry.has_model(run_id):
            if winner is ranked[0]:
                raise RegistryError(f"trial {winner.number} has no model logged in MLflow at {registry.tracking_uri} "
                                    "(was tracking off, or tracking.log_models none?)")
            without_model += 1  # under log_models: best, only the trials that were best when they ended have one
            continue
        version = registry.version_for_run(name, run_id)
        recorded = _recorded_value(version, rule.metric) if version is not None else None
        if version is not None and recorded is not None:
            return winner, version, False, recorded, tuple(refused)
        earlier = registry.serving_costs(run_id)
        broken = _broken_limits(cfg, earlier, winner) if earlier is not None else []
        if broken:
            refused.append(f"trial {winner.number}: {', '.join(broken)}, measured at an earlier selection")
            continue
        if measured == MAX_CONFIRMED:
            break
        dataset = dataset if dataset is not None else data()
        value, tags, costs = _evaluate(registry, run_id, dataset, rule.metric)
        measured += 1
        registry.record_serving_costs(run_id, costs)
        broken = _broken_limits(cfg, costs, winner)
        if broken:
            refused.append(f"trial {winner.number}: {', '.join(broken)}")
            continue
        tags.update({"workbench.study": study.study_name, "workbench.trial_number": str(winner.number),
                     "workbench.params": json.dumps(winner.params, sort_keys=True)})
        description = (f"Trial {winner.number} of study {study.study_name!r}: {rule.metric} = {value:.6g} on the test "
                       f"split; params {json.dumps(winner.params, sort_keys=True)}")
        version, created = registry.register(name, run_id, tags=tags, description=description)
        return winner, version, created, value, tuple(refused)
    unmeasured = f"; {without_model} other candidates have no logged model (tracking.log_models)" if without_model else ""
    raise NoWinner(f"no trial of {study.study_name!r} registered: measured again at registration, the serving costs of "
                   f"its best candidates break registry.limits or constraints: {'; '.join(refused)}{unmeasured}")


def _broken_limits(cfg: StudyConfig, costs: dict[str, float], trial: optuna.trial.FrozenTrial) -> list[str]:
    """The serving costs (measured at registration) outside `constraints` or `registry.limits`."""
    return [f"{key} {costs[key]:.4g} (the trial recorded {trial.user_attrs.get(key)})"
            for key, limit in (*cfg.constraints.items(), *cfg.registry.limits.items())
            if key in costs and not limit.holds(costs[key])]


def _recorded_value(version: Any, metric: str) -> float | None:
    """The test metric a registered version was selected on, if it is the one asked for now."""
    tags = version.tags
    if tags.get("workbench.compare_metric") != metric or "workbench.compare_value" not in tags:
        return None
    return float(tags["workbench.compare_value"])


def _evaluate(registry: Registry, run_id: str, data: Dataset, metric: str) -> tuple[float, dict[str, str], dict[str, float]]:
    """The run's model on the test split, and what serving it costs (latency over several
    bursts, serving.probe): (the compared metric, the version's tags, the serving costs)."""
    from models.training import evaluate
    from serving.probe import serving_costs

    model = registry.load_keras(run_id)
    metrics = {f"test_{k}": v for k, v in evaluate(model, data.x_test, data.y_test).items()}
    metrics["n_params"] = float(model.count_params())
    costs = serving_costs(model, data.spec, data.x_val[:64], bursts=CONFIRM_BURSTS)
    metrics.update(costs)
    value = metrics[metric]
    tags = {"workbench.data_hash": data.fingerprint, "workbench.compare_metric": metric,
            "workbench.compare_value": repr(value), **{f"workbench.{k}": repr(v) for k, v in metrics.items()}}
    return value, tags, costs


@dataclass(frozen=True)
class ShadowRule:
    """The live-traffic evidence a challenger needs: enough shadow requests, none failed, and
    agreement with the champion (classification) or a small mean difference (regression)."""

    min_requests: int
    min_agreement: float | None = None
    max_mean_abs_diff: float | None = None


@dataclass(frozen=True)
class Promotion:
    model_name: str
    challenger: str
    champion: str
    promoted: bool
    why: str

    def describe(self) -> str:
        if self.promoted:
            return f"{self.model_name}: @challenger v{self.challenger} promoted to @champion (was v{self.champion}): {self.why}"
        return f"{self.model_name}: @champion stays v{self.champion}; @challenger v{self.challenger} not promoted: {self.why}"


def promote_challenger(location: MlflowLocation, name: str, rule: Criterion, shadow: ShadowRule | None) -> Promotion:
    """Make `@challenger` the champion if its shadow evidence meets `shadow`, or if its test metric
    beats the champion's (as a new selection would); the evidence is recorded on the version."""
    from serving.shadow import read_evidence

    registry = Registry(Store.at(location))
    challenger, champion = registry.by_alias(name, CHALLENGER), registry.by_alias(name, CHAMPION)
    if challenger is None or champion is None:
        raise RegistryError(f"registered model {name!r} needs both a @champion and a @challenger to promote one "
                            f"(it has {'no @champion' if champion is None else 'no @challenger'})")
    new, old = str(challenger.version), str(champion.version)
    reasons, refusals = [], []
    ours, theirs = challenger.tags.get("workbench.compare_value"), champion.tags.get("workbench.compare_value")
    if ours is not None and theirs is not None and rule.better(float(ours), float(theirs)):
        reasons.append(f"{rule.metric} {float(ours):.6g} beats {float(theirs):.6g}")
    else:
        refusals.append(f"{rule.metric} {'unknown' if ours is None else f'{float(ours):.6g}'} does not beat "
                        f"{'unknown' if theirs is None else f'{float(theirs):.6g}'}")
    evidence = read_evidence(registry.client, name, old, new) if shadow is not None else None
    if shadow is not None:
        assert evidence is not None
        verdict = _judge(evidence, shadow)
        (refusals if verdict else reasons).append(verdict or f"shadow evidence: {evidence.describe()}")
        t = evidence.total
        registry.client.set_model_version_tag(name, new, "workbench.shadow_evidence", json.dumps(
            {"champion": old, "requests": t.requests, "rows": t.rows, "errors": t.errors, "dropped": t.dropped,
             "agreement": evidence.agreement, "mean_abs_diff": evidence.mean_abs_diff, "runs": evidence.runs,
             "challenger_ms_per_request": round(1000 * t.challenger_seconds / t.requests, 4) if t.requests else None}))
    if not reasons:
        return Promotion(name, new, old, False, "; ".join(refusals))
    why = "; ".join(reasons)
    registry.make_champion(name, new, reason=f"promoted from @challenger: {why}")
    return Promotion(name, new, old, True, why)


def _judge(evidence: Evidence, shadow: ShadowRule) -> str | None:
    """None if the evidence meets the rule, else why not."""
    t = evidence.total
    if t.requests < shadow.min_requests:
        return f"{t.requests} shadow requests recorded, at least {shadow.min_requests} needed ({evidence.describe()})"
    if t.errors:
        return f"the challenger failed on {t.errors} of {t.requests} shadow requests"
    if evidence.task == "regression":
        if shadow.max_mean_abs_diff is None:
            raise RegistryError("a regression model's shadow evidence is a mean difference: give --max-mean-abs-diff")
        assert evidence.mean_abs_diff is not None  # requests >= min_requests >= 1 and no errors: rows were scored
        if evidence.mean_abs_diff > shadow.max_mean_abs_diff:
            return f"mean |difference| {evidence.mean_abs_diff:.4g} > {shadow.max_mean_abs_diff:g}"
        return None
    if shadow.min_agreement is None:
        raise RegistryError("a classifier's shadow evidence is an agreement rate: give --min-agreement")
    assert evidence.agreement is not None
    if evidence.agreement < shadow.min_agreement:
        return f"agreement {evidence.agreement:.4f} < {shadow.min_agreement:g} over {t.rows} rows"
    return None
