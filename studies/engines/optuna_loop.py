"""`engine: optuna`: this process's share of a study, trial after trial through `study.optimize`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from studies.engines.objective import Objective, TrialFailed
from studies.engines.session import Session, prepare_tensorflow
from studies.engines.stopping import StopRule, continued_since, record_stop
from studies.engines.workers import raise_if_signalled, signal_pending, signals_deferred
from studies.reporting.progress import Progress
from studies.storage.study import BUDGET_STATES, stopped_record

if TYPE_CHECKING:
    import optuna

    from studies.tracking import TrialTracker


def optimize(session: Session, tracker: TrialTracker | None, *, label: str | None, ignore_stop: bool = False) -> bool:
    """Trials until the study holds its budget of finished trials (counted across all workers),
    the timeout, budget.max_failed failures here, or budget.stop (judged here or by another
    worker). Returns whether it stopped on failures."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    cfg = session.loaded.config
    prepare_tensorflow(session.settings)
    raise_if_signalled()  # one that waited for TensorFlow's import
    progress = Progress(session.study, session.target, session.names, label=label)
    max_failed = cfg.budget.failure_limit

    def stop_on_failures_or_signal(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress.failed_here >= max_failed or signal_pending():
            study.stop()

    section = cfg.budget.stop
    rule = None if section is None or ignore_stop else StopRule(
        section, cfg.directions[0] == "minimize", since=continued_since(session.study))

    def stop_when_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        assert rule is not None
        if stopped_record(study) is not None:  # another worker judged it
            study.stop()
            return
        reason = rule.reason(study)
        if reason is not None:
            record_stop(study, reason, session.target)
            progress.bar.write(f"{progress.prefix}study stopped: {reason}")
            study.stop()

    states = tuple(TrialState[s] for s in BUDGET_STATES)
    objective = Objective(session.loaded, session.data, tracker, storage=session.storage, max_retries=cfg.budget.retries)
    try:
        remaining = session.target - session.finished()
        if remaining > 0:
            # A signal during Optuna's own steps (creating a trial, telling its state) waits for
            # them: cut there, a trial would stay RUNNING. Inside a trial it ends the trial as FAIL.
            with signals_deferred():
                session.study.optimize(
                    objective,
                    n_trials=remaining + max_failed,
                    timeout=cfg.budget.timeout,
                    catch=(TrialFailed,),
                    callbacks=[progress, MaxTrialsCallback(session.target, states=states), stop_on_failures_or_signal,
                               *([stop_when_done] if rule is not None else [])],
                    gc_after_trial=False,  # clear_session() frees each model; a full gc.collect() costs ~0.3 s a trial
                )
    finally:
        progress.close()
    if progress.failed_here >= max_failed:
        print(f"error: stopped after {progress.failed_here} failed trials (budget.max_failed); see fail_reason above",
              file=sys.stderr)
        return True
    return False
