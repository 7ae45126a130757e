"""Warm start on a changed space: trials to reach a cold study's final best, warm vs cold.

    python benchmarks/warm_start.py [--seeds 5] [--trials 20] [--epochs 10] [--quick]

Per seed (the study seed, so the data split, is the same for the three studies of a round):
1. an earlier study on search_spaces/mlp.yaml (the shipped breast_cancer config, `--trials`);
2. a cold study on search_spaces/mlp_wide.yaml (one range doubled, one activation added);
3. a warm study on mlp_wide.yaml, `--warm-start-from` the earlier one (its best runs first,
   all its trials inform TPE and successive halving; `--top-k` queues more).
Each study has the same budget. The cold study's final best is the target: how many finished
trials did the cold study need to reach it, and how many did the warm one? Goal (issue 18): the
warm start needs at most 0.5x the trials, on the median seed. One TensorFlow thread, no tracking.
Each study's trials are deterministic (seeded, one thread, one worker): the spread between seeds
is the noise, so `--seeds 20` (about 5 minutes) is the steadier figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(args: list[str]) -> None:
    from studies.run import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["configs/breast_cancer.yaml", "--no-tracking", *args])
    if code != 0:
        raise SystemExit(f"studies.run {' '.join(args)} exited {code}:\n{err.getvalue()[-2000:]}")


def curve(storage: str, name: str) -> list[float]:
    """Best value so far after each finished trial, in trial order."""
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    best, out = math.inf, []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state.name == "COMPLETE" and t.value is not None:
            best = min(best, t.value)
        if t.state.name in ("COMPLETE", "PRUNED"):
            out.append(best)
    return out


def trials_to_reach(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v <= target + 1e-12), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--top-k", type=int, default=None, help="warm_start.top_k (default: the config's default)")
    p.add_argument("--quick", action="store_true", help="1 seed, 4 trials, 2 epochs: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.trials, args.epochs = 1, 4, 2
    os.chdir(ROOT)
    common = ["--n-trials", str(args.trials), "--set", f"training.epochs={args.epochs}", "--no-register"]
    wide = ["--set", "search_space=../search_spaces/mlp_wide.yaml"]
    ratios: list[float] = []
    print(f"breast_cancer MLP, {args.trials} trials x {args.epochs} epochs per study; target = the cold study's final best")
    print(f"{'seed':>4} {'earlier best':>12} {'cold best':>10} {'cold needs':>10} {'warm needs':>10} {'warm best':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/optuna.db"
        for seed in range(args.seeds):
            base = ["--storage", storage, "--seed", str(seed), *common]
            run([*base, "--study-name", f"earlier{seed}"])
            run([*base, *wide, "--study-name", f"cold{seed}"])
            top_k = [] if args.top_k is None else ["--set", f"warm_start.top_k={args.top_k}"]
            run([*base, *wide, *top_k, "--study-name", f"warm{seed}", "--warm-start-from", f"earlier{seed}"])
            earlier, cold, warm = (curve(storage, f"{k}{seed}") for k in ("earlier", "cold", "warm"))
            target = cold[-1]
            cold_n, warm_n = trials_to_reach(cold, target), trials_to_reach(warm, target)
            ratio = (warm_n / cold_n) if (warm_n and cold_n) else math.inf
            ratios.append(ratio)
            print(f"{seed:>4} {earlier[-1]:12.5f} {target:10.5f} {cold_n!s:>10} {warm_n or 'never'!s:>10} {warm[-1]:10.5f} {ratio:6.2f}")
    median = statistics.median(ratios)
    print(f"\nmedian over {len(ratios)} seeds: the warm start needs {median:.2f}x the trials of a cold start to reach "
          f"its final best (goal <= 0.5x; 'never' counts as infinite)")


if __name__ == "__main__":
    main()
