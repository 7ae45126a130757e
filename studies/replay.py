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

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.replay", description=__doc__.splitlines()[0])
    p.add_argument("config", help="the study config the study was run with")
    p.add_argument("--trial", type=int, required=True, metavar="N", help="trial number")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL (as for studies.run)")
    p.add_argument("--study-name", metavar="NAME")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from studies.config import run_cli

    return run_cli(args.config, _overrides(args), lambda loaded: _main(loaded, args))


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"study.name={args.study_name}"] if args.study_name else [])]


def _main(loaded, args: argparse.Namespace) -> int:

    from search_spaces import from_flat
    from studies.objective import Objective
    from studies.run import _prepare_tensorflow, load_data, quiet_libraries
    from studies.settings import Settings
    from studies.study import derive_seed, load_existing

    settings = Settings()
    quiet_libraries()
    study = load_existing(loaded, args.storage, settings)
    trials = study.get_trials(deepcopy=False)
    if not 0 <= args.trial < len(trials):
        print(f"error: study {study.study_name!r} has no trial {args.trial} (it has {len(trials)})", file=sys.stderr)
        return EXIT_FAILURE
    stored = trials[args.trial]
    if not stored.params:
        print(f"error: trial {args.trial} has no parameters ({stored.state.name})", file=sys.stderr)
        return EXIT_FAILURE
    seed = derive_seed(loaded.config.study.seed, stored.number)
    params = from_flat(loaded.space, stored.params)
    epochs = stored.user_attrs.get("epochs_run") if stored.state.name == "PRUNED" else None
    if epochs:
        from studies.config import load_config

        loaded = load_config(str(loaded.source), [*_overrides(args), f"training.epochs={int(epochs)}"])
    data = load_data(loaded)
    _prepare_tensorflow(settings.tf_threads)
    replayed = Objective(loaded, data).replay(stored.params, params, seed, number=stored.number)
    print(f"trial {stored.number} ({stored.state.name}), seed {seed}"
          + (f", replayed for the {epochs} epochs it ran before pruning" if epochs else ""))
    for key, value in stored.params.items():
        print(f"  {key:<22} {value}")
    print(f"{'':<24}{'stored':>12}{'replayed':>12}")
    curve = replayed["curve"]
    for step, value in sorted(stored.intermediate_values.items()):
        print(f"  epoch {step:<16}{value:>12.5g}{_fmt(curve.get(step)):>12}")
    for key in sorted(k for k in replayed["attrs"] if k.startswith(("val_", "test_"))):
        print(f"  {key:<22}{_fmt(stored.user_attrs.get(key)):>12}{_fmt(replayed['attrs'][key]):>12}")
    return EXIT_OK


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.5g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
