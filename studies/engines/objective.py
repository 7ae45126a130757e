"""The objective: one trial = sample params, build, fit with per-epoch reports, score."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

from models.faults import RetryLog, describe, is_transient
from search_spaces import optuna_suggest, sample
from studies.engines.workers import interruption_reason, raise_if_signalled, signals_allowed, signals_deferred
from studies.storage.study import WARM_START_OF, WARM_START_SEED, derive_seed, improves, trial_metrics

if TYPE_CHECKING:
    import keras

    from models import Dataset
    from studies.config import LoadedConfig
    from studies.tracking import TrialTracker


class TrialFailed(Exception):
    """This trial failed (diverged, bad combination, error in training); the study goes on."""


@dataclass
class TrialOutcome:
    """What one trial produced, filled in as it goes and handed to the tracker at its end."""

    state: str = "FAIL"  # COMPLETE, PRUNED or FAIL
    metrics: dict[str, float] = field(default_factory=dict)  # logged as the run's metrics
    tags: dict[str, str] = field(default_factory=dict)  # the run's tags (fail reason, retries)
    attrs: dict[str, Any] = field(default_factory=dict)  # the Optuna trial's user attributes
    model: keras.Model | None = None  # the trained model (COMPLETE only)
    is_best: bool = False  # best of the study so far: its model is logged under log_models: best
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> objective value (replays)


def worker_label() -> str:
    """host:pid, recorded on each trial so a user (and a test) can tell which worker ran it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def retry_lineage(trial: optuna.Trial | optuna.trial.FrozenTrial) -> list[int]:
    """The trials this one re-runs, oldest first (Optuna's own retry_history system attribute)."""
    if isinstance(trial, optuna.trial.FrozenTrial):
        attrs = trial.system_attrs
    else:  # a live Trial no longer exposes system attrs (Optuna 5): the copy it loaded at its start does
        frozen = getattr(trial, "_cached_frozen_trial", None)
        attrs = frozen.system_attrs if frozen is not None else trial.storage.get_trial_system_attrs(trial._trial_id)
    return list(attrs.get("retry_history", []))


def requeue(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Queue a failed trial again with the same parameters, in the form Optuna's
    RetryHeartbeatStaleTrialCallback uses (system attrs failed_trial, retry_history)."""
    history = [*retry_lineage(trial), trial.number]
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"retry_reason": reason},
        system_attrs={"failed_trial": history[0], "retry_history": history},
    ))


class Objective:
    """Callable for `study.optimize`; the dataset is loaded once and shared by every trial.

    Failures: a deterministic error (bad parameters, NaN loss) fails the trial for good. A
    transient one (connection lost after the storage's and the tracker's own retries) fails it
    and queues it again with the same parameters, at most `max_retries` times in its lineage.
    Retries that succeeded are listed on the trial (user attr `transient_retries`) and its run
    (tag `workbench.retries`).
    """

    def __init__(self, loaded: LoadedConfig, data: Dataset, tracker: TrialTracker | None = None, *,
                 storage: Any = None, max_retries: int = 2) -> None:
        self.loaded = loaded
        self.data = data
        self.tracker = tracker
        # The workbench's RDB storage: its retry log, and one write for many user attributes.
        self.storage = storage
        self.retry_log: RetryLog = getattr(storage, "retry_log", None) or RetryLog()
        self.max_retries = max_retries
        self.worker = worker_label()
        cfg = loaded.config
        self.specs = cfg.objective.specs()
        first = self.specs[0]
        # Early stopping and pruning watch the first per-epoch objective metric (val_loss otherwise).
        self.monitor = first.name if first.name.startswith("val_") else "val_loss"
        direction = first.resolved_direction() if first.name.startswith("val_") else "minimize"
        self.mode = "min" if direction == "minimize" else "max"
        self.class_weight: dict[int, float] | None = None
        if cfg.training.class_weight == "balanced":
            from models.training import balanced_class_weight

            self.class_weight = balanced_class_weight(data.y_train)

    def set_attrs(self, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
        """Write several user attributes; one transaction on the workbench storage."""
        batch = getattr(self.storage, "set_trial_user_attrs", None)
        if batch is not None:
            batch(trial._trial_id, attrs)
        else:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)

    def one_transaction(self, trial: optuna.Trial) -> contextlib.AbstractContextManager[None]:
        """The trial's writes inside the block in one transaction on the workbench storage
        (studies.storage.rdb); one at a time on any other."""
        batched = getattr(self.storage, "one_transaction", None)
        return batched(trial._trial_id) if batched is not None else contextlib.nullcontext()

    def may_win(self, metrics: dict[str, Any]) -> bool:
        """Within constraints and registry.limits (metrics by name: objective values and user
        attributes): a model the selector may register."""
        cfg = self.loaded.config
        return not (cfg.constraints or cfg.registry.limits) or cfg.eligible(metrics)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        return self.run(trial)

    def seed(self, trial: optuna.Trial) -> int:
        """The trial's seed: a function of the study seed and the trial number; a warm start's
        queued trial keeps its source trial's seed, so on the same data it reproduces that result
        (studies.storage.warm_start). Recorded on the trial and its run either way."""
        inherited = trial.user_attrs.get(WARM_START_SEED) if isinstance(trial, optuna.Trial) else None
        return int(inherited) if inherited is not None else derive_seed(self.loaded.config.study.seed, trial.number)

    def run(self, trial: optuna.Trial, *, model: Any = None, fit_options: dict[str, Any] | None = None,
            attrs: dict[str, Any] | None = None) -> float | tuple[float, ...]:
        """One trial. Another engine (KerasTuner) passes the model it built and seeded, its fit
        options (epochs, initial_epoch, callbacks) and attributes of its own to record."""
        seed = self.seed(trial)
        mark = self.retry_log.mark()
        lineage = retry_lineage(trial)
        outcome = TrialOutcome()
        start_attrs: dict[str, Any] = {"seed": seed, "worker": self.worker, **(attrs or {})}
        run_tags = {"workbench.seed": str(seed), "workbench.worker": self.worker,
                    **{f"workbench.{k}": str(v) for k, v in (attrs or {}).items()}}
        if lineage:
            start_attrs["retry_of"] = lineage[-1]
            run_tags |= {"workbench.retry_of": str(lineage[-1]), "workbench.retry_lineage": ",".join(map(str, lineage))}
        attrs = outcome.attrs
        run_id = None
        try:
            # The runner defers signals around Optuna's bookkeeping (ask, tell); the trial's own
            # work may be cut at once, since the handlers below record the interruption.
            with signals_allowed():
                with self.one_transaction(trial):
                    self.set_attrs(trial, start_attrs)
                    params = sample(self.loaded.space, optuna_suggest(trial))
                with signals_deferred():  # a run created but unknown here would stay RUNNING
                    run_id = self.tracker.start_trial(trial, params, run_tags) if self.tracker else None
                values = self._train(trial, params, seed, run_id, outcome, model=model, fit_options=fit_options)
            outcome.state = "COMPLETE"
            names = [spec.name for spec in self.specs]
            own = {**outcome.attrs, **dict(zip(names, values if isinstance(values, tuple) else (values,), strict=True))}
            outcome.is_best = self.may_win(own) and improves(
                trial.study, values, lambda other: self.may_win(trial_metrics(other, names)))
            return values
        except optuna.TrialPruned:
            outcome.state = "PRUNED"
            raise
        except KeyboardInterrupt as e:
            attrs["fail_reason"] = interruption_reason(e)
            outcome.tags["optuna.fail_reason"] = attrs["fail_reason"]
            raise
        except Exception as e:
            reason = describe(e)[:1000]
            if not is_transient(e):
                attrs["fail_reason"] = outcome.tags["optuna.fail_reason"] = reason
                raise TrialFailed(reason) from e
            attrs["fail_reason"] = outcome.tags["optuna.fail_reason"] = f"transient: {reason}"
            try:
                if len(lineage) < self.max_retries:
                    requeue(trial.study, trial, attrs["fail_reason"])
                    outcome.tags["workbench.requeued"] = "true"
            except Exception:  # the storage itself is gone: stop this worker, the trial goes stale
                raise e from None
            raise TrialFailed(attrs["fail_reason"]) from e
        finally:
            retried = self.retry_log.since(mark)
            if retried:
                outcome.tags["workbench.retries"] = "; ".join(retried)[:8000]
                attrs["transient_retries"] = retried[-50:]
            if attrs:
                _quietly(self.set_attrs, trial, attrs)
            if self.tracker is not None:
                self.tracker.end_trial(run_id, state=outcome.state, metrics=outcome.metrics, tags=outcome.tags,
                                       model=outcome.model, spec=self.data.spec, is_best=outcome.is_best)

    def replay(self, flat_params: dict[str, Any], params: dict[str, Any], seed: int, *, number: int) -> TrialOutcome:
        """Train once with fixed params and seed, outside any study: the per-epoch objective
        values (`curve`) and the attributes a trial would store (`attrs`)."""
        outcome = TrialOutcome()
        curve = outcome.curve

        class Replay(optuna.trial.FixedTrial):
            def report(self, value: float, step: int) -> None:
                curve[step] = float(value)

        try:
            self._train(Replay(flat_params, number=number), params, seed, None, outcome)
        except optuna.TrialPruned:  # cannot happen without a pruner; kept for clarity
            pass
        outcome.model = None
        return outcome

    def build(self, params: dict[str, Any], seed: int) -> Any:
        """A fresh model for these params, its weights drawn from the trial's seed."""
        from models import FAMILIES
        from models.runtime import fresh_keras

        fresh_keras(seed)  # no gc.collect() (~0.4 s a trial), and the kernel cache kept (models.runtime)
        return FAMILIES[self.loaded.config.model.family].build(params, self.data.spec)

    def _train(self, trial: optuna.trial.BaseTrial, params: dict[str, Any], seed: int, run_id: str | None,
               outcome: TrialOutcome, *, model: Any = None, fit_options: dict[str, Any] | None = None) -> float | tuple[float, ...]:
        from models.training import evaluate, fit
        from serving.probe import serving_costs

        cfg = self.loaded.config
        started = time.perf_counter()
        if model is None:
            model = self.build(params, seed)
        raise_if_signalled()  # each step below runs TensorFlow, where a signal waits (studies.engines.workers)
        metrics = outcome.metrics
        metrics["n_params"] = float(model.count_params())
        attrs = outcome.attrs
        attrs["n_params"] = int(model.count_params())

        def measure_serving_costs() -> dict[str, float]:  # the same for a trained network
            costs = serving_costs(model, self.data.spec, self.data.x_val[:64])
            metrics.update(costs)
            attrs.update(costs)
            raise_if_signalled()
            return costs

        # Before training where a constraint needs them, so pruned trials carry them too; else once
        # the trial completes (~15 ms): a pruned trial's network is never served.
        costs = measure_serving_costs() if cfg.constrains_serving else {}
        for key, value in cfg.constraint_values({**costs, "n_params": metrics["n_params"]}).items():
            trial.set_constraint(key, value)  # the sampler steers around infeasible regions

        best = _RunningBest(self.mode)
        # A warm start's queued trial re-runs a source's best: the pruner still records its rungs,
        # but it runs to the end (studies.storage.warm_start).
        prunable = not (isinstance(trial, optuna.Trial) and WARM_START_OF in trial.user_attrs)

        def report(epoch: int, logs: dict[str, float]) -> bool:
            raise_if_signalled()  # Keras calls this at each epoch's end: a safe point to stop
            if self.tracker is not None:
                self.tracker.log_epoch(run_id, epoch, logs)
            if cfg.multi_objective:
                return False
            trial.report(best.add(logs.get(self.monitor, float("nan"))), epoch)
            return trial.should_prune() and prunable

        attrs["setup_seconds"] = round(time.perf_counter() - started, 4)  # build (+ serving costs when measured first)
        options: dict[str, Any] = {"epochs": cfg.training.epochs, **(fit_options or {})}
        result = fit(
            model,
            self.data,
            batch_size=int(params.get("batch_size", cfg.training.batch_size)),
            monitor=self.monitor,
            mode=self.mode,
            patience=cfg.training.early_stopping_patience,
            report=report,
            class_weight=self.class_weight,
            **options,
        )
        attrs["epoch_seconds"] = result.extras["epoch_seconds"]  # where a trial's time goes (benchmarks/trial_cost.py)
        attrs["train_step"] = result.extras["train_step"]  # shared with earlier trials of its structure, or not
        metrics["epochs_run"] = float(result.epochs_run)
        metrics["fit_seconds"] = round(time.perf_counter() - started, 3)
        attrs["epochs_run"] = result.epochs_run
        attrs["fit_seconds"] = metrics["fit_seconds"]
        if result.stopped_by == "report":
            raise optuna.TrialPruned(f"pruned after epoch {result.epochs_run - 1}")
        attrs["best_epoch"] = result.best_epoch
        metrics["best_epoch"] = float(result.best_epoch)
        raise_if_signalled()
        if not cfg.constrains_serving:
            measure_serving_costs()
        validation = result.best_validation(int(options.get("initial_epoch", 0)))
        if validation is None:
            validation = evaluate(model, self.data.x_val, self.data.y_val)
        scores = {f"val_{k}": v for k, v in validation.items()}
        scores |= {f"test_{k}": v for k, v in evaluate(model, self.data.x_test, self.data.y_test).items()}
        attrs.update(scores)
        # In MLflow `val_*` is the per-epoch curve; the restored best epoch's scores get their own names.
        metrics.update({(f"best_{k}" if k.startswith("val_") else k): v for k, v in scores.items()})
        values = tuple(scores[s.name] if s.name in scores else metrics[s.name] for s in self.specs)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"objective value is not finite: {values}")
        outcome.model = model
        return values[0] if len(values) == 1 else values


class _RunningBest:
    """The best value of the monitored metric so far: what the trial would score if it ended now
    (fit ends with the best epoch's weights), so the pruner compares trials as their values will."""

    def __init__(self, mode: str) -> None:
        self.mode, self.value = mode, math.nan

    def add(self, value: float) -> float:
        if math.isfinite(value) and (math.isnan(self.value) or (value < self.value if self.mode == "min" else value > self.value)):
            self.value = value
        return value if math.isnan(self.value) else self.value


def _quietly(action: Any, *args: Any) -> None:
    """A best-effort storage write on a path that is already failing."""
    try:
        action(*args)
    except Exception:
        pass
