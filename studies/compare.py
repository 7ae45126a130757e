"""`python -m studies.compare CONFIG CONFIG ...`: studies side by side in one plotly page.

For each study (Optuna or KerasTuner engine, same storage or not): the best objective value so
far against the trial number, and against wall time (studies.reporting.best_so_far says how it
is counted). The page is written to a file and logged to MLflow (experiment `comparisons` by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from models.errors import ConfigError, ExitCode
from studies.cli import quiet_libraries, run_command, study_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.compare", parents=[study_flags(one_study=False)],
                                description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="study configs (two or more)")
    p.add_argument("--output", metavar="PATH", help="HTML file to write (default: <project data folder>/reports/compare-<studies>.html)")
    p.add_argument("--experiment", default="comparisons", help="MLflow experiment of the comparison run (default: comparisons)")
    p.add_argument("--no-tracking", action="store_true", help="write the file only, log nothing to MLflow")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.configs) < 2:
        print("error: give at least two study configs to compare", file=sys.stderr)
        return ExitCode.USAGE
    from studies.config import load_config

    quiet_libraries(verbose=args.verbose)
    return run_command(lambda: _compare([load_config(path) for path in args.configs], args))


def _compare(loaded: list[Any], args: argparse.Namespace) -> int:
    from studies.environment import Settings
    from studies.reporting.best_so_far import curve, page, summary_table, table
    from studies.storage.study import load_existing

    settings = Settings()
    names = [item.study_name for item in loaded]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError.single(str(loaded[i].source), "study.name", f"the study {name!r} is already in this comparison")
    curves = []
    for item in loaded:
        study = load_existing(item, args.storage, settings)
        if len(study.directions) != 1:
            raise ConfigError.single(str(item.source), "objective", "compare needs single-objective studies")
        curves.append(curve(study))
    first = curves[0]
    for item, c in zip(loaded[1:], curves[1:], strict=True):
        if (c.metric, c.direction) != (first.metric, first.direction):
            raise ConfigError.single(str(item.source), "objective", f"optimises {c.metric} ({c.direction}), but "
                                     f"{first.name} optimises {first.metric} ({first.direction}): nothing to compare")
    title = f"{first.metric}: " + " vs ".join(f"{c.name} ({c.engine})" for c in curves)
    text = page(curves, title)
    out = Path(args.output) if args.output else settings.workbench_home / "reports" / f"compare-{'-vs-'.join(names)}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(summary_table(curves))
    print(f"report: {out}")
    if not args.no_tracking:
        from studies.tracking import log_comparison

        run_id = log_comparison(settings.tracking_uri(), args.experiment, title=title, html_page=text, studies=names,
                                rows=table(curves), artifact_location=settings.artifact_root())
        print(f"logged to MLflow: experiment {args.experiment!r}, run {run_id}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
