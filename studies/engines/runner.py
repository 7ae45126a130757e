"""Running a study to its budget: open it, reclaim what dead workers left, run an engine (or
coordinate workers), track it in MLflow, summarise it and register its winner.

Budget on resume: `n_trials` is the number of finished (COMPLETE + PRUNED) trials the study
should hold in total, so a second run of the same command only does what is still missing.
"""

from __future__ import annotations

import functools
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.errors import ConfigError, ExitCode
from studies.engines.session import Session, open_session, prepare_tensorflow
from studies.engines.stopping import blocked_by_stop
from studies.engines.workers import Interrupted, SignalStop, run_workers
from studies.reporting.progress import Stopwatch, summary
from studies.storage.rdb import StaleTrialHandler, redact
from studies.storage.study import reclaim, state_counts, stopped_record
from studies.tracking import Tracker, close_stale_run, reconcile

if TYPE_CHECKING:
    import optuna

    from studies.config import LoadedConfig
    from studies.environment import Settings


# A study attribute: the last run was interrupted, so a resume that finds the budget met still
# ends the parent run and registers the winner.
INTERRUPTED_ATTR = "workbench_interrupted"


@dataclass(frozen=True)
class RunOptions:
    """How this invocation runs the study (the runner's flags that are not config keys)."""

    storage: str | None = None
    allow_space_change: bool = False
    ignore_stop: bool = False  # run even though budget.stop ended the study, and judge no stop criterion
    workers: int = 1
    worker_index: int | None = None  # set for each worker process that --workers starts
    argv: list[str] = field(default_factory=list)  # the command line, handed on to each worker

    @property
    def is_worker(self) -> bool:
        return self.worker_index is not None


def run_study(loaded: LoadedConfig, settings: Settings, options: RunOptions) -> int:
    """Run the study until its budget is met; returns the exit code. Ctrl-C or SIGTERM: the
    running trials end as FAIL "interrupted (SIG...)", the parent run ends KILLED, 130/143."""
    if loaded.config.engine == "keras_tuner" and (options.workers > 1 or options.is_worker):
        raise ConfigError.single(str(loaded.source), "engine", "KerasTuner runs its search in one process: "
                                 "drop --workers, or use engine: optuna to share a study between workers")
    stop = SignalStop()
    try:
        return _run(loaded, settings, options, stop)
    finally:
        stop.restore()


def _run(loaded: LoadedConfig, settings: Settings, options: RunOptions, stop: SignalStop) -> int:
    clock = Stopwatch()
    session = open_session(loaded, settings, storage_flag=options.storage, worker_index=options.worker_index,
                           allow_space_change=options.allow_space_change)
    study, cfg = session.study, loaded.config
    blocked = None if options.is_worker else blocked_by_stop(study, session.target, ignore_stop=options.ignore_stop)
    budget_met = not options.is_worker and (session.finished() >= session.target or blocked is not None)
    if budget_met:
        print(blocked or f"study {study.study_name!r} already has {session.finished()} finished trials "
              f"(budget {session.target}); raise --n-trials to run more", file=sys.stderr)
        if not study.user_attrs.get(INTERRUPTED_ATTR):
            print(summary(study, storage_url=redact(session.url), wall_seconds=clock.seconds, metric_names=session.names))
            return ExitCode.OK
        # The budget was met by a run that was then interrupted: no trial to run, but its parent
        # run is still KILLED and its winner unregistered; finish those below.
    # Sequential on purpose: overlapping the MLflow import with TensorFlow's fought over the GIL
    # and took longer than the two one after the other.
    tracker = _start_tracking(session)
    if tracker is not None:
        stale = session.storage.get_heartbeat_stale_trial_callback()
        assert isinstance(stale, StaleTrialHandler)  # open_session always sets a heartbeat (HEARTBEAT_SECONDS >= 1)
        stale.on_stale = functools.partial(close_stale_run, tracker)
    failed = False
    settled = False  # the engine returned or was interrupted (not an error on its way out)
    stopped_workers: set[str] = set()  # host:pid of the workers this coordinator ran, once they exited
    try:
        if not options.is_worker:  # trials and runs a dead worker left behind, before any new trial starts
            reclaim(study, session.storage)
            if tracker is not None:
                reconcile(tracker, study)
        if budget_met:
            pass
        elif options.workers > 1 and not options.is_worker:
            failed = _coordinate(session, options, stop, stopped_workers)
        elif cfg.engine == "keras_tuner":
            prepare_tensorflow(settings)  # before keras_tuner's own import of TensorFlow
            from studies.engines.keras_tuner import run_keras_tuner

            failed = run_keras_tuner(session, tracker)
        else:
            from studies.engines.optuna_loop import optimize

            failed = optimize(session, tracker, label=None if not options.is_worker else f"w{options.worker_index}",
                              ignore_stop=options.ignore_stop)
        settled = True
    except Interrupted:
        settled = True
        print("interrupted: recording the running trials and closing the runs (a second signal stops at once)",
              file=sys.stderr, flush=True)
    finally:
        stop.closing = True
        if tracker is not None:
            if not options.is_worker:  # runs a stopped worker could not close (all of ours have stopped by now)
                _quietly(reconcile, tracker, study, stopped_workers)
            if options.is_worker or not settled:
                _end_tracking(tracker, study, session.names, stop.signum is not None, end_parent=not options.is_worker)
    interrupted = stop.signum is not None
    if options.is_worker:
        return stop.exit_code() if interrupted else (ExitCode.FAILURE if failed else ExitCode.OK)
    if interrupted != bool(study.user_attrs.get(INTERRUPTED_ATTR)):
        _quietly(study.set_user_attr, INTERRUPTED_ATTR, interrupted)
    print(summary(study, storage_url=redact(session.url), wall_seconds=clock.seconds, metric_names=session.names), flush=True)
    if tracker is not None:
        # After the summary: the user has the result while the last trial's logging, the study
        # report and the parent run finish (the selector below needs the winner's model logged).
        _end_tracking(tracker, study, session.names, interrupted, end_parent=True)
    if interrupted:
        print("interrupted: running trials were recorded as FAIL (reason \"interrupted\"); run the same command to resume",
              file=sys.stderr)
        return stop.exit_code()
    if stop.signum is not None:  # a signal once the trials were done: the records are whole, the winner waits
        return _stopped_before_selection(study, stop)
    if tracker is not None and cfg.registry.auto and state_counts(study)["COMPLETE"]:
        from studies.selection import select

        stop.closing = False  # registering is no clean-up: a signal stops it at once, and a rerun registers
        try:
            print(select(loaded, study, lambda: session.data, settings).describe())
        except Interrupted:
            return _stopped_before_selection(study, stop)
    return ExitCode.FAILURE if failed else ExitCode.OK


def _stopped_before_selection(study: optuna.Study, stop: SignalStop) -> int:
    """The study is done but its winner is not registered: marked as interrupted, so the same
    command (finding its budget met) ends the parent run and registers the winner."""
    _quietly(study.set_user_attr, INTERRUPTED_ATTR, True)
    print("interrupted after the trials: the winner is not registered yet; run the same command to register it",
          file=sys.stderr)
    return stop.exit_code()


def _quietly(action: Callable[..., Any], *args: Any) -> None:
    try:
        action(*args)
    except Exception as e:  # clean-up must not hide the study's own result
        print(f"warning: {e}", file=sys.stderr)


def _coordinate(session: Session, options: RunOptions, stop: SignalStop, stopped_workers: set[str]) -> bool:
    """Run the worker processes on the session's study, then fail the running trials of workers
    that died (SIGKILL, out of memory) at once instead of waiting for their heartbeat to expire.
    Returns whether the run failed (a worker failed, or the budget was not reached)."""
    n = options.workers
    print(f"study {session.study.study_name!r}: {n} workers, {session.finished()}/{session.target} finished trials",
          file=sys.stderr)
    outcome = run_workers(options.argv, n)
    # Every worker has exited: a trial still RUNNING on one of them (killed, or stopped by an
    # error the worker could not record) is failed now rather than when its heartbeat expires.
    host = socket.gethostname()
    stopped_workers.update(f"{host}:{pid}" for pid in outcome.pids)
    reclaim(session.study, session.storage, dead_workers=stopped_workers, requeue=False)
    if outcome.signal is not None:
        stop.signum = outcome.signal
        raise Interrupted(outcome.signal)
    if outcome.failed:
        print(f"error: worker(s) {', '.join(map(str, outcome.failed))} exited with an error (see above)", file=sys.stderr)
        return True
    if session.finished() < session.target and stopped_record(session.study) is None:
        print(f"error: the study has {session.finished()} of {session.target} finished trials: every worker stopped",
              file=sys.stderr)
        return True
    return False


def _start_tracking(session: Session) -> Tracker | None:
    """The MLflow tracker with the study's parent run, or None when tracking is off."""
    loaded, settings, study = session.loaded, session.settings, session.study
    if not loaded.config.tracking.enabled:
        return None
    cfg = loaded.config.tracking
    tracker = Tracker(settings.tracking_uri(), cfg.experiment or study.study_name, artifact_location=settings.artifact_root(),
                      log_models=cfg.log_models, flush_seconds=cfg.flush_seconds, registry_uri=settings.registry_uri())
    tracker.start_study(study, loaded, data_hash=session.data.fingerprint, storage_url=redact(session.url))
    return tracker


def _end_tracking(tracker: Tracker, study: optuna.Study, names: list[str], interrupted: bool, *, end_parent: bool) -> None:
    """Wait for this process's logging; a worker stops there, the coordinator (or a lone
    runner) also writes the study report and summary and ends the parent run."""
    from studies.reporting.plots import study_report

    if not end_parent:
        tracker.close()
        return
    report: str | None
    try:
        tracker.wait()
        report = study_report(study, names)
    except Exception as e:  # a report must never hide the study's own result
        print(f"warning: could not draw the study report: {e}", file=sys.stderr)
        report = None
    tracker.end_study(study, report_html=report, status="KILLED" if interrupted else "FINISHED")
    tracker.close()
