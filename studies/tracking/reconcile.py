"""Runs left behind by dead workers: a stale trial's run is closed, and child runs left RUNNING
although their trial finished are closed as FAILED with the reason in `workbench.fail_reason`."""

from __future__ import annotations

import functools
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from studies.tracking.client import retry_step, tags_of
from studies.tracking.names import RUN_ID_ATTR

if TYPE_CHECKING:
    import optuna

    from studies.tracking.tracker import Tracker

# A run whose trial finished this long ago but is still RUNNING lost its worker mid-upload.
SETTLE_SECONDS = 300.0


def close_stale_run(tracker: Tracker, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A stale-trial callback: the trial's worker died (no heartbeat), so close its run."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        reason = f"worker lost: no heartbeat from {trial.user_attrs.get('worker', 'its worker')}, trial {trial.number} failed"
        tracker.log.submit(run_id, lambda: _close(tracker, run_id, "FAIL", reason), "closing the run of a stale trial")


def reconcile(tracker: Tracker, study: optuna.Study, stopped_workers: Collection[str] = ()) -> int:
    """Close child runs left RUNNING although their trial has finished (its worker died
    between the trial's end and its run's end): they become FAILED with the reason in the
    `workbench.fail_reason` tag. Runs whose trial still runs are left to the heartbeat. A run whose
    trial ended moments ago may still be uploading, unless its worker (host:pid) is one of
    `stopped_workers`, known to have exited (a coordinator's workers once they all stopped)."""
    query = f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}' AND attributes.status = 'RUNNING'"
    runs = retry_step(lambda: tracker.client.search_runs([tracker.experiment_id], filter_string=query, max_results=1000),
                      "looking for runs left RUNNING")
    if not runs:
        return 0
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    now = time.time()
    closed = 0
    for run in runs:
        number = run.data.tags.get("optuna.trial_number")
        trial = trials.get(int(number)) if number and number.isdigit() else None
        if trial is None or not trial.state.is_finished():
            continue
        if trial.user_attrs.get(RUN_ID_ATTR) == run.info.run_id and trial.datetime_complete is not None \
                and now - trial.datetime_complete.timestamp() < SETTLE_SECONDS \
                and trial.user_attrs.get("worker") not in stopped_workers:
            continue  # its worker may still be uploading the model
        reason = (f"worker stopped before closing this run; trial {trial.number} is {trial.state.name}"
                  + (f" ({trial.user_attrs['fail_reason']})" if trial.user_attrs.get("fail_reason") else ""))
        tracker.log.submit(run.info.run_id, functools.partial(_close, tracker, run.info.run_id, trial.state.name, reason),
                           "closing a run left RUNNING")
        closed += 1
    return closed


def _close(tracker: Tracker, run_id: str, state: str, reason: str) -> None:
    tracker.client.log_batch(run_id, tags=tags_of({"optuna.state": state, "workbench.fail_reason": reason[:4000],
                                                 "workbench.reconciled": "true"}))
    tracker.client.set_terminated(run_id, status="FAILED")
