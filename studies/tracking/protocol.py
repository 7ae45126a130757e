"""What an engine's trial loop needs from a tracker: the objective calls these three, and
nothing else, so a test or another backend can stand in for MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import keras
    import optuna

    from models import DataSpec


class TrialTracker(Protocol):
    def start_trial(self, trial: optuna.Trial, params: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        """Open the trial's run; its id, or None when the run could not be created (the trial goes on)."""

    def log_epoch(self, run_id: str | None, epoch: int, logs: dict[str, float]) -> None:
        """Record one epoch's metrics (buffered)."""

    def end_trial(self, run_id: str | None, *, state: str, metrics: dict[str, float], tags: dict[str, str],
                  model: keras.Model | None = None, spec: DataSpec | None = None, is_best: bool = False) -> None:
        """Record how the trial ended, with its model when it is kept."""
