"""Trials per hour with 1 and with 2 workers (`python -m studies.run ... --workers N`) on one
PostgreSQL study, on this 2-core machine.

    scripts/stack.sh up mlflow && eval "$(scripts/stack.sh env --tests)"
    python benchmarks/workers.py [--quick] [--trials 30] [--rounds 2]

The model is a fixed CPU-bound MLP (2 x 64 units, only the learning rate is searched, so every
trial does the same work), 10 epochs, no pruning, no early stopping, tracking off; each worker
process has one TensorFlow intra-op and one inter-op thread (TF_THREADS=1, OMP_NUM_THREADS=1).
Runs alternate 1 worker, 2 workers, and the machine's ceiling (two independent runs on two
studies at once, half the trials each, nothing shared), after a warm-up run, each on a fresh
study. Two figures per run:
steady-state trials/hour (finished trials over the span from the first trial's start to the
last one's end, from the storage's timestamps) and whole-command trials/hour (start-up
included: each worker process imports TensorFlow). Headline: median 2-worker / 1-worker ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/optuna"


def write_config(folder: Path, epochs: int) -> Path:
    space = folder / "fixed_mlp.yaml"
    space.write_text(yaml.safe_dump({"params": {
        "n_layers": {"type": "fixed", "value": 2},
        "units": {"type": "fixed", "value": 64},
        "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": {"type": "fixed", "value": 32},
    }}))
    config = folder / "workers_bench.yaml"
    config.write_text(yaml.safe_dump({
        "study": {"name": "workers_bench", "seed": 3},
        "dataset": {"name": "breast_cancer"},
        "model": {"family": "mlp"},
        "search_space": str(space),
        "objective": {"metric": "val_loss"},
        "budget": {"n_trials": 1},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "training": {"epochs": epochs, "batch_size": 32, "early_stopping_patience": None},
        "tracking": {"enabled": False},
        "registry": {"auto": False},
    }))
    return config


def run(config: Path, url: str, workers: int, n_trials: int, *, independent: bool = False) -> dict:
    """One measurement. `independent`: the machine's own ceiling, two separate runs on two
    separate studies at once (half the trials each): the same work, nothing shared."""
    import optuna

    env = {**os.environ, "TF_THREADS": "1", "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "WORKBENCH_HOME": str(config.parent / "home")}
    names = [f"bench_workers_{workers}_{uuid.uuid4().hex[:6]}" for _ in range(2 if independent else 1)]
    per_study = n_trials // len(names)
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "studies.run", str(config), "--storage", url, "--study-name", name,
                               "--n-trials", str(per_study), "--workers", str(1 if independent else workers)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name in names]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"run with {workers} workers failed:\n{err[-3000:]}")
    trials = [t for name in names for t in optuna.load_study(study_name=name, storage=url).trials
              if t.state.name == "COMPLETE"]
    for name in names:
        optuna.delete_study(study_name=name, storage=url)
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return {"workers": "2 independent" if independent else workers, "trials": len(trials), "wall": wall, "span": span,
            "steady": len(trials) / span * 3600, "whole": len(trials) / wall * 3600}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 trials of 2 epochs, 1 round, no warm-up")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--url", default=os.environ.get("WORKBENCH_TEST_POSTGRES_URL", DEFAULT_URL))
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.rounds = 4, 2, 1
    config = write_config(Path(tempfile.mkdtemp(prefix="bench-workers-")), args.epochs)
    print(f"{args.trials} trials x {args.epochs} epochs, fixed 2x64 MLP on breast_cancer, 1 TF thread per worker, "
          f"PostgreSQL storage, {os.cpu_count()} cores")
    if not args.quick:
        run(config, args.url, 1, 3)  # warm-up: page cache, PostgreSQL
    results = []
    for _ in range(args.rounds):
        for workers, independent in ((1, False), (2, False), (2, True)):
            r = run(config, args.url, workers, args.trials, independent=independent)
            results.append(r)
            print(f"workers {r['workers']}: {r['trials']} trials, steady {r['steady']:7.0f} trials/h ({r['span']:.1f} s), "
                  f"whole command {r['whole']:7.0f} trials/h ({r['wall']:.1f} s)", flush=True)

    def median(workers: int | str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["workers"] == workers)

    steady = median(2, "steady") / median(1, "steady")
    ceiling = median("2 independent", "steady") / median(1, "steady")
    whole = median(2, "whole") / median(1, "whole")
    print(f"medians (steady state): 1 worker {median(1, 'steady'):.0f} trials/h, 2 workers {median(2, 'steady'):.0f}, "
          f"2 independent runs {median('2 independent', 'steady'):.0f} (this machine's ceiling for 2 processes: "
          f"{ceiling:.2f}x); whole-command ratio {whole:.2f}")
    print(f"headline: 2 workers / 1 worker = {steady:.2f}x trials per hour (goal >= 1.7; "
          f"{steady / ceiling:.2f} of the machine's 2-process ceiling {ceiling:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
