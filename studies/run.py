"""`python -m studies.run CONFIG`: create or resume a study and run trials until its budget is met.

Budget on resume: `n_trials` is the number of finished (COMPLETE + PRUNED) trials the study
should hold in total, so a second run of the same command only does what is still missing.
Exit codes: 0 done, 1 runtime failure (storage, too many failed trials), 2 user mistake,
130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM: the running trials end as FAIL with
reason "interrupted (SIGINT|SIGTERM)", the parent run ends KILLED, the next invocation resumes.
`--workers N` runs N processes (studies.workers); each is this runner with `--worker-index`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m studies.run",
        description="Run (or resume) an Optuna study that trains one Keras model per trial.",
        epilog="n_trials counts finished trials (COMPLETE + PRUNED) across runs: re-running resumes.",
    )
    p.add_argument("config", help="study config YAML, e.g. configs/breast_cancer.yaml")
    p.add_argument("--n-trials", type=int, metavar="N", help="finished trials the study should reach (budget.n_trials)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long (budget.timeout)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL; default $OPTUNA_STORAGE, then study.storage, then SQLite in .workbench/")
    p.add_argument("--study-name", metavar="NAME", help="study name (study.name; default: the config file's name)")
    p.add_argument("--seed", type=int, help="study seed: data split, sampler, per-trial seeds (study.seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="overrides",
                   help="override any config key, e.g. --set training.epochs=5 (repeatable)")
    p.add_argument("--allow-space-change", action="store_true", help="resume a study even though its search space changed")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (tracking.enabled: false)")
    p.add_argument("--no-register", action="store_true", help="do not register the winner at the end (registry.auto: false)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes sharing the study (default 1); use a PostgreSQL storage for more than one")
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by --workers for each worker it starts
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    sugar = {"budget.n_trials": args.n_trials, "budget.timeout": args.timeout, "study.name": args.study_name,
             "study.seed": args.seed, "tracking.enabled": False if args.no_tracking else None,
             "registry.auto": False if args.no_register else None}
    return [*args.overrides, *(f"{k}={v}" for k, v in sugar.items() if v is not None)]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    from studies.config import run_cli

    def body(loaded) -> int:
        if loaded.config.engine == "keras_tuner" and (args.workers > 1 or args.worker_index is not None):
            from search_spaces import ConfigError

            raise ConfigError.single(str(loaded.source), "engine", "KerasTuner runs its search in one process: "
                                     "drop --workers, or use engine: optuna to share a study between workers")
        return _run(loaded, args, argv)

    try:
        return run_cli(args.config, _overrides(args), body)
    except KeyboardInterrupt:  # before the study started: nothing to record
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def load_data(loaded):
    """The study's dataset, split by study.seed; a data problem becomes a ConfigError at dataset.<key>."""
    from models import DatasetError, load_dataset
    from search_spaces import ConfigError

    ds = loaded.config.dataset
    try:
        return load_dataset(
            name=ds.name, path=loaded.data_path, target=ds.target, features=ds.features, task=loaded.task,
            image_shape=tuple(ds.image_shape) if ds.image_shape else None,
            validation=ds.split.validation, test=ds.split.test, seed=loaded.config.study.seed, columns=ds.columns,
        )
    except DatasetError as e:
        raise ConfigError.single(str(loaded.source), f"dataset.{e.key}".rstrip("."), e.message) from None


def describe_data(data) -> list[str]:
    """The column kinds of a mixed-type table and what loading left out (empty for plain arrays)."""
    table = data.spec.table
    lines = [f"data: {len(data.x_train)} train / {len(data.x_val)} validation / {len(data.x_test)} test rows, "
             f"{len(table.feature_names)} columns -> {table.width} model inputs", *table.describe()] if table else []
    return lines + [f"data: {note}" for note in data.notes]


def quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _prepare_tensorflow(threads: int | None) -> None:
    """Import TensorFlow/Keras (~4 s) and fix its thread pools before the first trial."""
    import keras  # noqa: F401
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


@dataclass
class Session:
    """What one invocation (a worker, or a coordinator of workers) works on."""

    loaded: Any
    settings: Any
    data: Any
    url: str
    storage: Any
    study: Any
    names: list[str]
    target: int

    def finished(self) -> int:
        from studies.study import BUDGET_STATES, state_counts

        counts = state_counts(self.study)
        return sum(counts[s] for s in BUDGET_STATES)


def _open(loaded, args: argparse.Namespace) -> Session:
    from studies.samplers import build_pruner, build_sampler, read_completed_once_per_trial
    from studies.settings import Settings
    from studies.storage import open_storage, resolve_url
    from studies.study import open_study, sampler_seed

    settings = Settings()
    cfg = loaded.config
    data = load_data(loaded)
    if args.worker_index is None:  # once per study command, not once per worker
        for line in describe_data(data):
            print(line)
    quiet_libraries()
    url = resolve_url(args.storage, settings.optuna_storage, cfg.study.storage, settings.default_storage())
    # KerasTuner re-runs a trial it lost itself: its studies never queue a stale trial again.
    retries = cfg.budget.retries if cfg.engine == "optuna" else 0
    storage = open_storage(url, heartbeat_interval=settings.heartbeat_seconds, max_retry=retries)
    study = open_study(loaded, storage, study_name=loaded.study_name,
                       allow_space_change=args.allow_space_change, data_hash=data.fingerprint)
    if cfg.engine == "optuna":
        base_seed = cfg.sampler.seed if cfg.sampler.seed is not None else cfg.study.seed
        study.sampler = build_sampler(cfg.sampler, sampler_seed(base_seed, len(study.get_trials(deepcopy=False)), args.worker_index), loaded)
        study.pruner = read_completed_once_per_trial(build_pruner(cfg.pruner))
    else:  # the tuner picks every value; Optuna only records them
        import optuna

        study.sampler = optuna.samplers.RandomSampler(seed=cfg.study.seed)
        study.pruner = optuna.pruners.NopPruner()
    return Session(loaded, settings, data, url, storage, study, [m.name for m in cfg.objective.specs()], cfg.budget.n_trials)


def _run(loaded, args: argparse.Namespace, argv: list[str]) -> int:
    from studies.workers import SignalStop

    stop = SignalStop()
    try:
        return _run_study(loaded, args, argv, stop)
    finally:
        stop.restore()


def _run_study(loaded, args: argparse.Namespace, argv: list[str], stop) -> int:
    from studies.report import Stopwatch, summary
    from studies.storage import redact
    from studies.study import reclaim, state_counts
    from studies.workers import Interrupted

    clock = Stopwatch()
    session = _open(loaded, args)
    study, cfg = session.study, loaded.config
    worker = args.worker_index is not None
    if not worker and session.finished() >= session.target:
        print(f"study {study.study_name!r} already has {session.finished()} finished trials (budget {session.target}); "
              "raise --n-trials to run more", file=sys.stderr)
        print(summary(study, storage_url=redact(session.url), wall_seconds=clock.seconds, metric_names=session.names))
        return EXIT_OK
    # Sequential on purpose: overlapping the MLflow import with TensorFlow's fought over the GIL
    # and took longer than the two one after the other.
    tracker = _start_tracking(loaded, session.settings, study, session.data.fingerprint, redact(session.url))
    if tracker is not None:
        session.storage.get_heartbeat_stale_trial_callback().on_stale = tracker.close_stale_run
    failed = False
    try:
        if not worker:  # trials and runs a dead worker left behind, before any new trial starts
            reclaim(study, session.storage)
            if tracker is not None:
                tracker.reconcile(study)
        if args.workers > 1 and not worker:
            failed = _coordinate(session, argv, args.workers, stop)
        elif cfg.engine == "keras_tuner":
            from studies.kt_engine import run_keras_tuner

            _prepare_tensorflow(session.settings.tf_threads)
            failed = run_keras_tuner(session, tracker)
        else:
            failed = _optimize(session, tracker, label=None if not worker else f"w{args.worker_index}")
    except Interrupted:
        pass
    finally:
        stop.closing = True
        if tracker is not None:
            if not worker:  # runs a stopped worker could not close (all of ours have stopped by now)
                _quietly(tracker.reconcile, study)
            _end_tracking(tracker, study, session.names, stop.signum is not None, end_parent=not worker)
    interrupted = stop.signum is not None
    if worker:
        return stop.exit_code() if interrupted else (EXIT_FAILURE if failed else EXIT_OK)
    print(summary(study, storage_url=redact(session.url), wall_seconds=clock.seconds, metric_names=session.names))
    if interrupted:
        print("interrupted: running trials were recorded as FAIL (reason \"interrupted\"); run the same command to resume",
              file=sys.stderr)
        return stop.exit_code()
    if tracker is not None and cfg.registry.auto and state_counts(study)["COMPLETE"]:
        from studies.select import select

        print(select(loaded, study, session.data, session.settings).describe())
    if failed:
        return EXIT_FAILURE
    return EXIT_OK


def _quietly(action, *args) -> None:
    try:
        action(*args)
    except Exception as e:  # clean-up must not hide the study's own result
        print(f"warning: {e}", file=sys.stderr)


def _optimize(session: Session, tracker, *, label: str | None) -> bool:
    """This process's share of the study: trials until the study holds its budget of finished
    trials (counted across all workers), the timeout, or budget.max_failed failures here.
    Returns whether it stopped on failures."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from studies.objective import Objective, TrialFailed
    from studies.report import Progress
    from studies.study import BUDGET_STATES
    from studies.workers import signal_pending, signals_deferred

    cfg = session.loaded.config
    _prepare_tensorflow(session.settings.tf_threads)
    progress = Progress(session.study, session.target, session.names, label=label)
    max_failed = cfg.budget.failure_limit

    def stop_on_failures_or_signal(study, trial) -> None:
        if progress.failed_here >= max_failed or signal_pending():
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
                    callbacks=[progress, MaxTrialsCallback(session.target, states=states), stop_on_failures_or_signal],
                    gc_after_trial=False,  # clear_session() frees each model; a full gc.collect() costs ~0.3 s a trial
                )
    finally:
        progress.close()
    if progress.failed_here >= max_failed:
        print(f"error: stopped after {progress.failed_here} failed trials (budget.max_failed); see fail_reason above",
              file=sys.stderr)
        return True
    return False


def _coordinate(session: Session, argv: list[str], n: int, stop) -> bool:
    """Run n worker processes on the session's study, then fail the running trials of workers
    that died (SIGKILL, out of memory) at once instead of waiting for their heartbeat to expire.
    Returns whether the run failed (a worker failed, or the budget was not reached)."""
    from studies.study import reclaim
    from studies.workers import Interrupted, run_workers

    print(f"study {session.study.study_name!r}: {n} workers, {session.finished()}/{session.target} finished trials",
          file=sys.stderr)
    outcome = run_workers(argv, n)
    # Every worker has exited: a trial still RUNNING on one of them (killed, or stopped by an
    # error the worker could not record) is failed now rather than when its heartbeat expires.
    host = socket.gethostname()
    reclaim(session.study, session.storage, dead_workers={f"{host}:{pid}" for pid in outcome.pids}, requeue=False)
    if outcome.signal is not None:
        stop.signum = outcome.signal
        raise Interrupted(str(outcome.signal))
    if outcome.failed:
        print(f"error: worker(s) {', '.join(map(str, outcome.failed))} exited with an error (see above)", file=sys.stderr)
        return True
    if session.finished() < session.target:
        print(f"error: the study has {session.finished()} of {session.target} finished trials: every worker stopped",
              file=sys.stderr)
        return True
    return False


def _start_tracking(loaded, settings, study, data_hash: str, storage_url: str):
    """The MLflow tracker with the study's parent run, or None when tracking is off."""
    if not loaded.config.tracking.enabled:
        return None
    from studies.tracking import Tracker

    cfg = loaded.config.tracking
    tracker = Tracker(settings.tracking_uri(), cfg.experiment or study.study_name, artifact_location=settings.artifact_root(),
                      log_models=cfg.log_models, flush_seconds=cfg.flush_seconds, registry_uri=settings.registry_uri())
    tracker.start_study(study, loaded, data_hash=data_hash, storage_url=storage_url)
    return tracker


def _end_tracking(tracker, study, names: list[str], interrupted: bool, *, end_parent: bool = True) -> None:
    """Wait for this process's logging; a worker stops there, the coordinator (or a lone
    runner) also writes the study report and summary and ends the parent run."""
    from studies.reports import study_report

    if not end_parent:
        tracker.close()
        return
    try:
        tracker.wait()
        report = study_report(study, names)
    except Exception as e:  # a report must never hide the study's own result
        print(f"warning: could not draw the study report: {e}", file=sys.stderr)
        report = None
    tracker.end_study(study, report_html=report, status="KILLED" if interrupted else "FINISHED")
    tracker.close()


if __name__ == "__main__":
    sys.exit(main())
