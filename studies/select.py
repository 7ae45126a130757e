"""`python -m studies.select CONFIG`: register the study's winning model and move the aliases.

The rule (studies.selection.promote): the winner is evaluated on the test split, registered as a
version of `registry.model_name`, and becomes `@champion` if it beats the current champion, else
`@challenger`. `--force` makes it champion anyway; `--rollback` moves `@champion` back.
`--promote-challenger` makes `@challenger` the champion on its shadow evidence from live traffic
(`--min-requests`, `--min-agreement` or `--max-mean-abs-diff`; serving.shadow) or on a better
test metric, and records the evidence on the version.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from models.errors import ExitCode
from studies.cli import run_with_config, study_flags

if TYPE_CHECKING:
    from models import Dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.select", parents=[study_flags()],
                                description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="make the winner @champion even if it does not beat the current one")
    p.add_argument("--rollback", action="store_true", help="move @champion back to the previous champion and exit")
    g = p.add_argument_group("promotion on live traffic (SERVING_SHADOW_ALIAS=challenger on the API)")
    g.add_argument("--promote-challenger", action="store_true",
                   help="make @challenger the champion if its shadow evidence meets the thresholds below, or if its "
                   "test metric beats the champion's; the evidence is recorded on the version")
    g.add_argument("--min-requests", type=_count, default=500, help="shadow requests needed (default 500)")
    g.add_argument("--min-agreement", type=_share, help="classification: share of rows with the champion's label")
    g.add_argument("--max-mean-abs-diff", type=_non_negative, help="regression: mean |challenger - champion| allowed")
    return p


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    thresholds = args.min_agreement is not None or args.max_mean_abs_diff is not None
    if thresholds and not args.promote_challenger:
        parser.error("--min-agreement and --max-mean-abs-diff go with --promote-challenger")
    if args.promote_challenger and (args.force or args.rollback):
        parser.error("--promote-challenger cannot be combined with --force or --rollback")
    return run_with_config(args, lambda loaded: _select(loaded, args))


def _select(loaded, args: argparse.Namespace) -> int:
    from serving.store import Store
    from studies.engines.session import load_data, prepare_tensorflow
    from studies.environment import Settings
    from studies.selection import Registry, ShadowRule, criterion, promote_challenger, select
    from studies.storage.study import load_existing

    settings = Settings()
    name = loaded.config.registry.model_name or loaded.study_name
    if args.rollback:
        old, new = Registry(Store.at(settings)).rollback(name)
        print(f"{name}: @champion moved back from v{old} to v{new}")
        return ExitCode.OK
    if args.promote_challenger:
        shadow = (ShadowRule(args.min_requests, args.min_agreement, args.max_mean_abs_diff)
                  if args.min_agreement is not None or args.max_mean_abs_diff is not None else None)
        print(promote_challenger(settings, name, criterion(loaded.config), shadow).describe())
        return ExitCode.OK
    study = load_existing(loaded, args.storage, settings)

    def data() -> Dataset:  # only for a winner not registered yet: it is evaluated on the test split
        prepare_tensorflow(settings)  # Keras, quietly unless --verbose
        return load_data(loaded)

    print(select(loaded, study, data, settings, force=args.force).describe())
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
