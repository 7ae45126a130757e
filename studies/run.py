"""`python -m studies.run CONFIG`: create or resume a study and run trials until its budget is met.

Budget on resume: `n_trials` is the number of finished (COMPLETE + PRUNED) trials the study
should hold in total, so a second run of the same command only does what is still missing.
Exit codes: 0 done, 1 runtime failure (storage, too many failed trials), 2 user mistake,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

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
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    sugar = {"budget.n_trials": args.n_trials, "budget.timeout": args.timeout, "study.name": args.study_name,
             "study.seed": args.seed, "tracking.enabled": False if args.no_tracking else None,
             "registry.auto": False if args.no_register else None}
    return [*args.overrides, *(f"{k}={v}" for k, v in sugar.items() if v is not None)]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    from studies.config import run_cli

    return run_cli(args.config, _overrides(args), lambda loaded: _run(loaded, args))


def load_data(loaded):
    """The study's dataset, split by study.seed; a data problem becomes a ConfigError at dataset.<key>."""
    from models import DatasetError, load_dataset
    from search_spaces import ConfigError

    ds = loaded.config.dataset
    try:
        return load_dataset(
            name=ds.name, path=loaded.data_path, target=ds.target, features=ds.features, task=loaded.task,
            image_shape=tuple(ds.image_shape) if ds.image_shape else None,
            validation=ds.split.validation, test=ds.split.test, seed=loaded.config.study.seed,
        )
    except DatasetError as e:
        raise ConfigError.single(str(loaded.source), f"dataset.{e.key}".rstrip("."), e.message) from None


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


def _run(loaded, args: argparse.Namespace) -> int:
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from studies.objective import Objective, TrialFailed
    from studies.report import Progress, Stopwatch, summary
    from studies.samplers import build_pruner, build_sampler
    from studies.settings import Settings
    from studies.storage import open_storage, redact, resolve_url
    from studies.study import BUDGET_STATES, derive_seed, open_study, state_counts

    clock = Stopwatch()
    settings = Settings()
    cfg = loaded.config
    data = load_data(loaded)
    quiet_libraries()
    url = resolve_url(args.storage, settings.optuna_storage, cfg.study.storage, settings.default_storage())
    storage = open_storage(url, heartbeat_interval=settings.heartbeat_interval)
    study = open_study(loaded, storage, study_name=loaded.study_name,
                       allow_space_change=args.allow_space_change, data_hash=data.fingerprint)
    counts = state_counts(study)
    done = sum(counts[s] for s in BUDGET_STATES)
    target = cfg.budget.n_trials
    names = [m.name for m in cfg.objective.specs()]
    # Reseed on resume so a seeded sampler does not replay the first run's random draws.
    base_seed = cfg.sampler.seed if cfg.sampler.seed is not None else cfg.study.seed
    study.sampler = build_sampler(cfg.sampler, derive_seed(base_seed, len(study.trials)) if study.trials else base_seed, loaded)
    study.pruner = build_pruner(cfg.pruner)
    if done >= target:
        print(f"study {study.study_name!r} already has {done} finished trials (budget {target}); "
              "raise --n-trials to run more", file=sys.stderr)
        print(summary(study, storage_url=redact(url), wall_seconds=clock.seconds, metric_names=names))
        return EXIT_OK
    max_failed = cfg.budget.max_failed or target
    # Sequential on purpose: overlapping the MLflow import with TensorFlow's fought over the GIL
    # and took longer than the two one after the other.
    tracker = _start_tracking(loaded, settings, study, data.fingerprint, redact(url))
    _prepare_tensorflow(settings.tf_threads)
    progress = Progress(study, target, names)

    def stop_on_failures(study, trial) -> None:
        if progress.failed_here >= max_failed:
            study.stop()

    states = tuple(TrialState[s] for s in BUDGET_STATES)
    interrupted = False
    try:
        study.optimize(
            Objective(loaded, data, tracker),
            n_trials=(target - done) + max_failed,
            timeout=cfg.budget.timeout,
            catch=(TrialFailed,),
            callbacks=[progress, MaxTrialsCallback(target, states=states), stop_on_failures],
            gc_after_trial=False,  # clear_session() frees each model; a full gc.collect() costs ~0.3 s a trial
        )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        if tracker is not None:
            _end_tracking(tracker, study, names, interrupted)
    print(summary(study, storage_url=redact(url), wall_seconds=clock.seconds, metric_names=names))
    if interrupted:
        print("interrupted: the running trial was recorded as FAIL; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if tracker is not None and cfg.registry.auto and state_counts(study)["COMPLETE"]:
        from studies.select import select

        print(select(loaded, study, data, settings.tracking_uri()).describe())
    if progress.failed_here >= max_failed:
        print(f"error: stopped after {progress.failed_here} failed trials (budget.max_failed); see fail_reason above",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _start_tracking(loaded, settings, study, data_hash: str, storage_url: str):
    """The MLflow tracker with the study's parent run, or None when tracking is off."""
    if not loaded.config.tracking.enabled:
        return None
    from studies.tracking import Tracker

    cfg = loaded.config.tracking
    tracker = Tracker(settings.tracking_uri(), cfg.experiment or study.study_name, artifact_location=settings.artifact_root(),
                      log_models=cfg.log_models, flush_seconds=cfg.flush_seconds)
    tracker.start_study(study, loaded, data_hash=data_hash, storage_url=storage_url)
    return tracker


def _end_tracking(tracker, study, names: list[str], interrupted: bool) -> None:
    from studies.reports import study_report

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
