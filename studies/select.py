"""`python -m studies.select CONFIG`: register the study's winning model and move the aliases.

The rule (studies.selection.promote): the winner is evaluated on the test split, registered as a
version of `registry.model_name`, and becomes `@champion` if it beats the current champion, else
`@challenger`. `--force` makes it champion anyway; `--rollback` moves `@champion` back.
"""

from __future__ import annotations

import argparse
import sys

from models.errors import ExitCode
from studies.cli import run_with_config, study_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.select", parents=[study_flags()],
                                description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="make the winner @champion even if it does not beat the current one")
    p.add_argument("--rollback", action="store_true", help="move @champion back to the previous champion and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_with_config(args, lambda loaded: _select(loaded, args))


def _select(loaded, args: argparse.Namespace) -> int:
    from serving.store import Store
    from studies.engines.session import load_data, prepare_tensorflow
    from studies.environment import Settings
    from studies.selection import Registry, select
    from studies.storage.study import load_existing

    settings = Settings()
    name = loaded.config.registry.model_name or loaded.study_name
    if args.rollback:
        old, new = Registry(Store.at(settings)).rollback(name)
        print(f"{name}: @champion moved back from v{old} to v{new}")
        return ExitCode.OK
    study = load_existing(loaded, args.storage, settings)
    prepare_tensorflow(settings)  # the winner is evaluated again: Keras, quietly unless --verbose
    print(select(loaded, study, load_data(loaded), settings, force=args.force).describe())
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
