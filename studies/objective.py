"""The objective: one trial = sample params, build, fit with per-epoch reports, score."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import optuna

from search_spaces import optuna_suggest, sample
from studies.study import derive_seed, improves

if TYPE_CHECKING:
    from models import Dataset
    from studies.config import LoadedConfig
    from studies.tracking import Tracker


class TrialFailed(Exception):
    """This trial failed (diverged, bad combination, error in training); the study goes on."""


class Objective:
    """Callable for `study.optimize`; the dataset is loaded once and shared by every trial."""

    def __init__(self, loaded: LoadedConfig, data: Dataset, tracker: Tracker | None = None) -> None:
        self.loaded = loaded
        self.data = data
        self.tracker = tracker
        cfg = loaded.config
        self.specs = cfg.objective.specs()
        first = self.specs[0]
        # Early stopping and pruning watch the first per-epoch objective metric (val_loss otherwise).
        self.monitor = first.name if first.name.startswith("val_") else "val_loss"
        direction = first.resolved_direction() if first.name.startswith("val_") else "minimize"
        self.mode = "min" if direction == "minimize" else "max"

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        seed = derive_seed(self.loaded.config.study.seed, trial.number)
        trial.set_user_attr("seed", seed)
        params = sample(self.loaded.space, optuna_suggest(trial))
        run_id = self.tracker.start_trial(trial, params) if self.tracker else None
        outcome: dict[str, Any] = {"state": "FAIL", "metrics": {}, "model": None, "tags": {}}
        try:
            values = self._train(trial, params, seed, run_id, outcome)
            outcome["state"] = "COMPLETE"
            outcome["is_best"] = improves(trial.study, values)
            return values
        except optuna.TrialPruned:
            outcome["state"] = "PRUNED"
            raise
        except KeyboardInterrupt:
            outcome["tags"]["optuna.fail_reason"] = "interrupted"
            raise
        except Exception as e:
            if _is_storage_error(e):
                outcome["tags"]["optuna.fail_reason"] = f"storage error: {e}"[:1000]
                raise  # the storage is gone: stop the run, do not record a fake failure
            reason = f"{type(e).__name__}: {e}".strip()[:1000]
            trial.set_user_attr("fail_reason", reason)
            outcome["tags"]["optuna.fail_reason"] = reason
            raise TrialFailed(reason) from e
        finally:
            if self.tracker is not None:
                self.tracker.end_trial(run_id, state=outcome["state"], metrics=outcome["metrics"], tags=outcome["tags"],
                                       model=outcome["model"], spec=self.data.spec, is_best=outcome.get("is_best", False))

    def _train(self, trial: optuna.Trial, params: dict[str, Any], seed: int, run_id: str | None,
               outcome: dict[str, Any]) -> float | tuple[float, ...]:
        import keras

        from models import FAMILIES
        from models.training import evaluate, fit

        cfg = self.loaded.config
        keras.backend.clear_session(free_memory=False)  # gc.collect() here costs ~0.4 s a trial
        keras.utils.set_random_seed(seed)
        started = time.perf_counter()
        model = FAMILIES[cfg.model.family].build(params, self.data.spec)
        metrics: dict[str, float] = outcome["metrics"]
        metrics["n_params"] = float(model.count_params())
        trial.set_user_attr("n_params", int(model.count_params()))

        def report(epoch: int, logs: dict[str, float]) -> bool:
            if self.tracker is not None:
                self.tracker.log_epoch(run_id, epoch, logs)
            if cfg.multi_objective:
                return False
            trial.report(logs.get(self.monitor, float("nan")), epoch)
            return trial.should_prune()

        result = fit(
            model,
            self.data,
            epochs=cfg.training.epochs,
            batch_size=int(params.get("batch_size", cfg.training.batch_size)),
            monitor=self.monitor,
            mode=self.mode,
            patience=cfg.training.early_stopping_patience,
            report=report,
        )
        metrics["epochs_run"] = float(result.epochs_run)
        metrics["fit_seconds"] = round(time.perf_counter() - started, 3)
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("fit_seconds", metrics["fit_seconds"])
        if result.stopped_by == "report":
            raise optuna.TrialPruned(f"pruned after epoch {result.epochs_run - 1}")
        trial.set_user_attr("best_epoch", result.best_epoch)
        metrics["best_epoch"] = float(result.best_epoch)
        scores = {f"val_{k}": v for k, v in evaluate(model, self.data.x_val, self.data.y_val).items()}
        scores |= {f"test_{k}": v for k, v in evaluate(model, self.data.x_test, self.data.y_test).items()}
        for key, value in scores.items():
            trial.set_user_attr(key, value)
        # In MLflow `val_*` is the per-epoch curve; the restored best epoch's scores get their own names.
        metrics.update({(f"best_{k}" if k.startswith("val_") else k): v for k, v in scores.items()})
        values = tuple(scores[s.name] if s.name in scores else metrics[s.name] for s in self.specs)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"objective value is not finite: {values}")
        outcome["model"] = model
        return values[0] if len(values) == 1 else values


def _is_storage_error(e: BaseException) -> bool:
    try:
        import sqlalchemy.exc
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
