"""What the user sees while a study runs: a progress bar, one line per trial, a closing summary."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from studies.storage.study import BUDGET_STATES, best_trial, state_counts, stopped_record

if TYPE_CHECKING:
    import optuna


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


class Progress:
    """An Optuna callback: a tqdm bar of finished trials toward the budget, with the best value."""

    def __init__(self, study: optuna.Study, target: int, metric_names: list[str], *, label: str | None = None) -> None:
        from tqdm.auto import tqdm

        counts = state_counts(study)
        done = sum(counts[s] for s in BUDGET_STATES)
        self.metric_names = metric_names
        self.failed_here = 0
        # One of several workers: plain lines prefixed with the worker's label, no bar to fight over.
        self.prefix = f"[{label}] " if label else ""
        self.bar = tqdm(total=target, initial=min(done, target), desc=study.study_name, unit="trial", file=sys.stderr,
                        dynamic_ncols=True, disable=label is not None)
        self._postfix(study)

    def _postfix(self, study: optuna.Study) -> None:
        try:
            if len(study.directions) == 1:
                best = _fmt(study.best_value)
            else:
                best = f"{len(study.best_trials)} on the Pareto front"
        except ValueError:
            best = "-"
        self.bar.set_postfix_str(f"best {self.metric_names[0] if len(self.metric_names) == 1 else ''} {best}".replace("  ", " "))

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = trial.state.name
        values = _fmt(trial.values if trial.values and len(trial.values) > 1 else trial.value)
        detail = {
            "COMPLETE": f"{', '.join(self.metric_names)} = {values}",
            "PRUNED": f"pruned at epoch {trial.last_step}",
            "FAIL": str(trial.user_attrs.get("fail_reason", "failed")),
        }.get(state, "")
        epochs = trial.user_attrs.get("epochs_run")
        took = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete and trial.datetime_start else 0.0
        self.bar.write(f"{self.prefix}trial {trial.number:>4} {state:<8} {detail}  ({epochs if epochs is not None else '?'} epochs, {took:.1f} s)")
        if state in BUDGET_STATES:
            self.bar.update(1)
        elif state == "FAIL":
            self.failed_here += 1
        if state == "COMPLETE" and not self.bar.disable:  # the best read from the storage (~1.5 ms) when it may have moved
            self._postfix(study)

    def close(self) -> None:
        self.bar.close()


def summary(study: optuna.Study, *, storage_url: str, wall_seconds: float, metric_names: list[str]) -> str:
    """A plain-text table: best trial (or Pareto front), counts per state, wall time."""
    counts = state_counts(study)
    lines = [
        f"study      {study.study_name}",
        f"storage    {storage_url}",
        f"trials     COMPLETE {counts['COMPLETE']}  PRUNED {counts['PRUNED']}  FAIL {counts['FAIL']}"
        + (f"  RUNNING {counts['RUNNING']}" if counts["RUNNING"] else ""),
        f"wall time  {wall_seconds:.1f} s (this invocation)",
    ]
    stopped = stopped_record(study)
    if stopped is not None:
        lines.append(f"stopped    {stopped['reason']} (budget.stop, after {stopped['finished']} finished trials)")
    best = best_trial(study) if len(study.directions) == 1 else None
    if counts["COMPLETE"] == 0:
        lines.append("best       no COMPLETE trial yet")
    elif len(study.directions) == 1 and best is None:
        lines.append("best       no COMPLETE trial meets the constraints")
    elif best is not None:
        lines.append(f"best       trial {best.number}: {metric_names[0]} = {_fmt(best.value)}")
        lines.extend(f"  {k:<20} {_fmt(v)}" for k, v in best.params.items())
    else:
        lines.append(f"pareto     {len(study.best_trials)} trial(s): {', '.join(metric_names)}")
        for t in sorted(study.best_trials, key=lambda t: t.number):
            lines.append(f"  trial {t.number:<5} {_fmt(t.values)}")
    width = max(len(line) for line in lines)
    rule = "-" * min(width, 100)
    return "\n".join([rule, *lines, rule])


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
