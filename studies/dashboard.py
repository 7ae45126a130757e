"""`python -m studies.dashboard CONFIG`: optuna-dashboard on the study's storage.

The storage is found as `studies.run` finds it (--storage, $OPTUNA_STORAGE, study.storage, the
embedded SQLite file), so every study in it, Optuna and KerasTuner engine alike, shows side by
side. The same without this command: `optuna-dashboard <storage URL>`.
"""

from __future__ import annotations

import argparse
import sys

from models.errors import ExitCode
from studies.cli import run_with_config, study_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.dashboard", parents=[study_flags()],
                                description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_with_config(args, lambda loaded: _serve(loaded, args))


def _serve(loaded, args: argparse.Namespace) -> int:
    import optuna
    import optuna_dashboard

    from studies.environment import Settings
    from studies.storage import open_storage, redact

    settings = Settings()
    url = settings.storage_url(args.storage, loaded.config.study.storage)
    storage = open_storage(url)  # checks the storage answers before the server starts
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"optuna-dashboard on {base}/dashboard  (storage {redact(url)}, {len(summaries)} studies)")
    for summary in summaries:
        mark = "  <- this config" if summary.study_name == loaded.study_name else ""
        print(f"  {summary.study_name:<32} {summary.n_trials:>5} trials  {base}/dashboard/studies/{summary._study_id}{mark}")
    if loaded.study_name not in {s.study_name for s in summaries}:
        print(f"  (no study named {loaded.study_name!r} yet: run `python -m studies.run {loaded.source}` first)")
    sys.stdout.flush()
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except OSError as e:  # the port is taken, the address is not ours
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
