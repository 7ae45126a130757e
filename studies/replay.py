"""`python -m studies.replay CONFIG --trial N`: retrain one trial alone and compare.

The trial's parameters come from the study, its seed from (study seed, trial number), the data
split from the config: nothing else. The study is not changed and nothing is logged. The output
puts the stored per-epoch objective values and final metrics beside the replayed ones, so a
trial that does not reproduce (another data file, another library version) shows at once. A
PRUNED trial is replayed for the epochs it ran.
"""

from __future__ import annotations

import argparse
import math
import sys

from models.errors import ExitCode
from studies.cli import overrides, run_with_config, study_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.replay", parents=[study_flags()],
                                description=__doc__.splitlines()[0])
    p.add_argument("--trial", type=int, required=True, metavar="N", help="trial number")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_with_config(args, lambda loaded: _replay(loaded, args))


def _replay(loaded, args: argparse.Namespace) -> int:
    from studies.engines.retrain import retrain
    from studies.environment import Settings
    from studies.storage.study import load_existing

    settings = Settings()
    study = load_existing(loaded, args.storage, settings)
    result = retrain(loaded, study, args.trial, settings, overrides(args))
    stored = result.stored
    print(f"trial {stored.number} ({stored.state.name}), seed {result.seed}"
          + (f", replayed for the {result.epochs} epochs it ran before pruning" if result.epochs else ""))
    for key, value in stored.params.items():
        print(f"  {key:<22} {value}")
    print(f"{'':<24}{'stored':>12}{'replayed':>12}")
    for step, value in sorted(stored.intermediate_values.items()):
        print(f"  epoch {step:<16}{value:>12.5g}{_fmt(result.curve.get(step)):>12}")
    for key in sorted(k for k in result.attrs if k.startswith(("val_", "test_"))):
        print(f"  {key:<22}{_fmt(stored.user_attrs.get(key)):>12}{_fmt(result.attrs[key]):>12}")
    return ExitCode.OK


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.5g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
