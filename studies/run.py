"""`python -m studies.run CONFIG`: create or resume a study and run trials until its budget is met.

Exit codes (models.errors.ExitCode): 0 done, 1 runtime failure (storage, too many failed trials),
2 user mistake, 130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM: the running trials
end as FAIL with reason "interrupted (SIGINT|SIGTERM)", the parent run ends KILLED, the next
invocation resumes. `--workers N` runs N processes, each this command with `--worker-index`.
"""

from __future__ import annotations

import argparse
import sys

from studies.cli import run_with_config, study_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m studies.run", parents=[study_flags()],
        description="Run (or resume) an Optuna study that trains one Keras model per trial.",
        epilog="n_trials counts finished trials (COMPLETE + PRUNED) across runs: re-running resumes.",
    )
    p.add_argument("--n-trials", type=int, metavar="N", help="finished trials the study should reach (budget.n_trials)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long (budget.timeout)")
    p.add_argument("--seed", type=int, help="study seed: data split, sampler, per-trial seeds (study.seed)")
    p.add_argument("--allow-space-change", action="store_true", help="resume a study even though its search space changed")
    p.add_argument("--warm-start-from", metavar="STUDY[@STORAGE_URL]",
                   help="start or extend the study from another study's trials, even on a changed search space "
                        "(warm_start.from; the best warm_start.top_k run first)")
    p.add_argument("--ignore-stop", action="store_true",
                   help="run although budget.stop ended the study, and judge no stop criterion in this run")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (tracking.enabled: false)")
    p.add_argument("--no-register", action="store_true", help="do not register the winner at the end (registry.auto: false)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes sharing the study (default 1); use a PostgreSQL storage for more than one")
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by --workers for each worker it starts
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    from studies.engines.runner import RunOptions, run_study
    from studies.environment import Settings

    options = RunOptions(storage=args.storage, allow_space_change=args.allow_space_change,
                         ignore_stop=args.ignore_stop, workers=args.workers,
                         worker_index=args.worker_index, argv=argv)
    sugar = {"budget.n_trials": args.n_trials, "warm_start.from": args.warm_start_from, "budget.timeout": args.timeout, "study.seed": args.seed,
             "tracking.enabled": False if args.no_tracking else None,
             "registry.auto": False if args.no_register else None}
    return run_with_config(args, lambda loaded: run_study(loaded, Settings(), options), sugar=sugar)


if __name__ == "__main__":
    sys.exit(main())
