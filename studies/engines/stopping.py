"""Study-level stop (`budget.stop`): end the whole study, every worker, once it stopped paying off.

Each worker judges the study's finished trials (shared storage) after each of its trials; the
first to find a criterion met records it on the study (STOPPED_ATTR: the reason, the finished
count and the budget then) and the others stop when they see the record. A resumed study that
finds the record does not run, unless --n-trials goes beyond the budget it stopped under (the
criteria judge only the trials after that point) or --ignore-stop is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from studies.storage.study import STOPPED_ATTR, feasible, stopped_record

if TYPE_CHECKING:
    import optuna

    from studies.config.sections import StopSection


@dataclass(frozen=True)
class StopRule:
    """The criteria of budget.stop for one study direction, judged on finished trials after `since`."""

    section: StopSection
    minimize: bool
    since: int = 0  # finished trials (in completion order) that came before this invocation's continuation

    def reason(self, study: optuna.Study) -> str | None:
        """Why the study should stop now, or None."""
        finished = finished_in_order(study)[self.since:]
        # Only trials within the constraints count: an infeasible one reaches no target.
        complete = [t for t in finished if t.state.name == "COMPLETE" and t.value is not None and feasible(t)]
        if not complete:
            return None
        sign = 1.0 if self.minimize else -1.0
        best = min(complete, key=lambda t: (sign * float(t.value or 0.0), t.number))
        best_value = float(best.value or 0.0)
        stop = self.section
        if stop.target is not None and sign * best_value <= sign * stop.target:
            op = "<=" if self.minimize else ">="
            return f"target reached: trial {best.number} has {best_value:.6g} {op} {stop.target:g}"
        if stop.patience is not None:
            last, best_so_far = -1, math.inf
            counted = {t.number for t in complete}
            for i, t in enumerate(finished):
                if t.number in counted and sign * float(t.value or 0.0) < best_so_far - stop.min_delta:
                    last, best_so_far = i, sign * float(t.value or 0.0)
            waited = len(finished) - 1 - last
            if last >= 0 and waited >= stop.patience:
                delta = f" of at least {stop.min_delta:g}" if stop.min_delta else ""
                return (f"no improvement{delta} in {waited} finished trials (patience {stop.patience}); "
                        f"best {sign * best_so_far:.6g} at trial {finished[last].number}")
        if stop.regret_bound is not None and len(complete) >= stop.min_trials:
            from studies.engines.regret import regret_bound

            bound = regret_bound(complete, minimize=self.minimize)
            if bound is not None and bound < stop.regret_bound:
                return (f"regret bound {bound:.4g} < {stop.regret_bound:g}: a Gaussian process over {len(complete)} "
                        "trials sees little left to gain")
        return None


def finished_in_order(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE and PRUNED trials in the order they finished."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sorted(trials, key=lambda t: (t.datetime_complete or datetime.max, t.number))


def record_stop(study: optuna.Study, reason: str, n_trials: int) -> None:
    study.set_user_attr(STOPPED_ATTR, {"reason": reason, "finished": len(finished_in_order(study)), "n_trials": n_trials,
                                       "at": datetime.now(UTC).isoformat(timespec="seconds")})


def continued_since(study: optuna.Study) -> int:
    """Finished trials before the study was continued past its last stop (0 if it never stopped)."""
    record = study.user_attrs.get(STOPPED_ATTR)
    return int(record.get("since", 0)) if isinstance(record, dict) else 0


def blocked_by_stop(study: optuna.Study, n_trials: int, *, ignore_stop: bool) -> str | None:
    """Why a study that stopped earlier does not run now (None: it runs). It runs again beyond
    the budget it stopped under, or with --ignore-stop; the criteria then judge only later trials."""
    record = stopped_record(study)
    if record is None:
        return None
    if ignore_stop or n_trials > int(record.get("n_trials", 0)):
        study.set_user_attr(STOPPED_ATTR, {"since": int(record.get("finished", 0)), "after": record["reason"]})
        return None
    return (f"study {study.study_name!r} stopped early ({record['reason']}); raise --n-trials "
            f"beyond {record.get('n_trials')} or pass --ignore-stop to run more")
