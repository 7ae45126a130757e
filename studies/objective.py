"""The objective: one trial = sample params, build, fit with per-epoch reports, score."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import optuna

from search_spaces import optuna_suggest, sample
from studies.study import derive_seed

if TYPE_CHECKING:
    from models import Dataset
    from studies.config import LoadedConfig


class TrialFailed(Exception):
    """This trial failed (diverged, bad combination, error in training); the study goes on."""


class Objective:
    """Callable for `study.optimize`; the dataset is loaded once and shared by every trial."""

    def __init__(self, loaded: LoadedConfig, data: Dataset) -> None:
        self.loaded = loaded
        self.data = data
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
        try:
            return self._train(trial, params, seed)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            if _is_storage_error(e):
                raise  # the storage is gone: stop the run, do not record a fake failure
            reason = f"{type(e).__name__}: {e}".strip()[:1000]
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason) from e

    def _train(self, trial: optuna.Trial, params: dict[str, Any], seed: int) -> float | tuple[float, ...]:
        import keras

        from models import FAMILIES
        from models.training import evaluate, fit

        cfg = self.loaded.config
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        started = time.perf_counter()
        model = FAMILIES[cfg.model.family].build(params, self.data.spec)
        trial.set_user_attr("n_params", int(model.count_params()))

        def report(epoch: int, logs: dict[str, float]) -> bool:
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
            report=None if cfg.multi_objective else report,
        )
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("fit_seconds", round(time.perf_counter() - started, 3))
        if result.stopped_by == "report":
            raise optuna.TrialPruned(f"pruned after epoch {result.epochs_run - 1}")
        trial.set_user_attr("best_epoch", result.best_epoch)
        metrics = {f"val_{k}": v for k, v in evaluate(model, self.data.x_val, self.data.y_val).items()}
        metrics |= {f"test_{k}": v for k, v in evaluate(model, self.data.x_test, self.data.y_test).items()}
        metrics["n_params"] = float(model.count_params())
        for key, value in metrics.items():
            if key != "n_params":
                trial.set_user_attr(key, value)
        values = tuple(metrics[s.name] for s in self.specs)
        return values[0] if len(values) == 1 else values


def _is_storage_error(e: BaseException) -> bool:
    try:
        import sqlalchemy.exc
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
