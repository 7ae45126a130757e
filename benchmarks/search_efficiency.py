"""Search efficiency: best validation loss within the same wall-time budget, Optuna vs KerasTuner.

    python benchmarks/search_efficiency.py [--quick] [--seeds 5] [--budget digits=90,breast_cancer=60,churn=60]
                                           [--contenders optuna,kt_hyperband,...] [--parallel 2]

Every contender searches the shipped MLP space (search_spaces/mlp.yaml; on the mixed-type table
`churn`, configs/data/churn.csv, the table's space search_spaces/mlp_table.yaml) on the same data split
(study seed = benchmark seed), training at most 20 epochs with early stopping (patience 4),
objective val_loss, one TensorFlow thread (TF_THREADS=1, OMP_NUM_THREADS=1), tracking off,
SQLite storage, no trace cache (TRACE_CACHE=0: each run traces what it meets), each run a fresh
`python -m studies.run` process with `budget.timeout` = B:

  optuna        the shipped default (configs/*.yaml): multivariate TPE + successive halving (OPTUNA below)
  kt_hyperband  engine: keras_tuner, Hyperband (factor 3, max_epochs 20)
  kt_bayesian   engine: keras_tuner, BayesianOptimization
  random        Optuna's RandomSampler, no pruner, budget B
  random_2x     the same with budget 2B

KerasTuner runs through the workbench's keras_tuner engine, so both sides build, train and
score the very same Keras models; what differs is which trials run, and for how long.

Time axis: seconds of running trials (from the study's timestamps, union of trial intervals),
so process start-up and the TensorFlow import count for no one. Reported per dataset: the best
val_loss reached within B (median over seeds, min-max), and the running time each contender
needed to reach KerasTuner Hyperband's final best of the same seed ("never" when it did not
within its budget). Runs of one seed are started together, two at a time (--parallel 2: each
process has one thread, pairs share the machine alike), contenders in rotating order.
Headline: median over seeds of (optuna time to KT Hyperband's best) / (KT Hyperband's time).
That ratio hangs on the moment KT Hyperband found its final best, which moves run to run with the
same search (0.778 and 1.17 for the same Optuna results, 2026-12-06). Beside it, a measure of the
whole curve: each contender's best so far, its mean distance over the budget from the seed's best
final value (any contender's; before a contender's first value, the seed's worst first value), and
optuna's / KT Hyperband's, median over seeds.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPOCHS, PATIENCE = 20, 4
# The shipped default (configs/breast_cancer.yaml, configs/digits_mlp.yaml): what "optuna" runs.
OPTUNA = {
    "sampler": {"type": "tpe", "options": {"n_startup_trials": 5, "multivariate": True, "group": True}},
    "pruner": {"type": "successive_halving", "options": {"min_resource": 2, "reduction_factor": 3}},
}
CONTENDERS = {
    "optuna": {**OPTUNA},
    "kt_hyperband": {"engine": "keras_tuner", "keras_tuner": {"tuner": "hyperband", "options": {"factor": 3}}},
    "kt_bayesian": {"engine": "keras_tuner", "keras_tuner": {"tuner": "bayesian"}},
    "random": {"sampler": {"type": "random"}, "pruner": {"type": "none"}},
    "random_2x": {"sampler": {"type": "random"}, "pruner": {"type": "none"}},
}
# Variants for choosing the default (--contenders optuna_xxx,...).
_TPE5 = {"type": "tpe", "options": {"n_startup_trials": 5, "multivariate": True, "group": True}}
VARIANTS = {
    "optuna_nopruner": {"sampler": OPTUNA["sampler"], "pruner": {"type": "none"}},
    "optuna_tpe5_hyperband": {"sampler": _TPE5,
                              "pruner": {"type": "hyperband", "options": {"min_resource": 2, "reduction_factor": 3}}},
    "optuna_tpe5_sh": {"sampler": _TPE5,
                       "pruner": {"type": "successive_halving", "options": {"min_resource": 2, "reduction_factor": 3}}},
    "optuna_tpe5_sh1": {"sampler": _TPE5,
                        "pruner": {"type": "successive_halving", "options": {"min_resource": 1, "reduction_factor": 3}}},
    "optuna_tpe5_sh4": {"sampler": _TPE5,
                        "pruner": {"type": "successive_halving", "options": {"min_resource": 4, "reduction_factor": 3}}},
    "optuna_tpe5_sh6": {"sampler": _TPE5,
                        "pruner": {"type": "successive_halving", "options": {"min_resource": 6, "reduction_factor": 3}}},
    "optuna_tpe5_median": {"sampler": _TPE5,
                           "pruner": {"type": "median", "options": {"n_startup_trials": 3, "n_warmup_steps": 2}}},
    "optuna_previous_default": {"sampler": {"type": "tpe", "options": {"n_startup_trials": 8}},
                                "pruner": {"type": "median", "options": {"n_startup_trials": 5, "n_warmup_steps": 3}}},
}


# The mixed-type example table (configs/churn.yaml's data and space); the others are bundled datasets.
TABLES = {
    "churn": ({"path": str(ROOT / "configs" / "data" / "churn.csv"), "target": "churn",
               "columns": {"customer_id": "id"}}, "binary", "mlp_table.yaml"),
}


def config(folder: Path, dataset: str, contender: str, seed: int, budget: float) -> Path:
    spec = {**CONTENDERS, **VARIANTS}[contender]
    data = {
        "study": {"name": f"{dataset}_{contender}_s{seed}", "seed": seed},
        **({"engine": spec["engine"], "keras_tuner": spec["keras_tuner"]} if "engine" in spec else {}),
        "dataset": TABLES[dataset][0] if dataset in TABLES else {"name": dataset},
        "model": {"family": "mlp", "task": TABLES[dataset][1]} if dataset in TABLES else {"family": "mlp"},
        "search_space": str(ROOT / "search_spaces" / (TABLES[dataset][2] if dataset in TABLES else "mlp.yaml")),
        "objective": {"metric": "val_loss"},
        "budget": {"n_trials": 100_000, "timeout": budget * (2 if contender == "random_2x" else 1), "max_failed": 1000},
        **({k: spec[k] for k in ("sampler", "pruner") if k in spec}),
        "training": {"epochs": EPOCHS, "early_stopping_patience": PATIENCE},
        "tracking": {"enabled": False},
        "registry": {"auto": False},
    }
    path = folder / f"{dataset}_{contender}_s{seed}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(path: Path, folder: Path, storage: str) -> tuple[int, float, str]:
    # TRACE_CACHE=0: each study traces every structure it meets, as on a machine that never ran one
    # (models.trace_cache would hand later studies of the run what earlier ones traced, and only to
    # the contenders that train whole epochs: KerasTuner's fits go batch by batch).
    env = {**os.environ, "TF_THREADS": "1", "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "WORKBENCH_HOME": str(folder / "home"), "TRACE_CACHE": "0"}
    env.pop("OPTUNA_STORAGE", None)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "studies.run", str(path), "--storage", storage], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    return out.returncode, time.perf_counter() - started, out.stderr[-2000:]


def evaluate(storage: str, name: str, budget: float):
    """The study's curve cut at `budget` seconds of running trials."""
    import optuna

    from studies.reporting.best_so_far import curve

    c = curve(optuna.load_study(study_name=name, storage=storage))
    keep = [i for i, t in enumerate(c.seconds) if t <= budget + 1e-9]
    c.seconds = [c.seconds[i] for i in keep]
    c.best = [c.best[i] for i in keep]
    c.trial_numbers = [c.trial_numbers[i] for i in keep]
    return c


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "never"
    return f"{value:.{digits}g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, the churn table, 8 s budget, 2 contenders")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", default="digits=90,breast_cancer=60,churn=60", help="seconds per run, per dataset")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--parallel", type=int, default=2, help="runs at once (each uses one thread)")
    p.add_argument("--report", metavar="URL", help="only print the tables of an earlier run's storage")
    args = p.parse_args(argv)
    budgets = {k: float(v) for k, v in (item.split("=") for item in args.budget.split(","))}
    contenders = args.contenders.split(",")
    seeds = list(range(args.seeds))
    if args.quick:
        budgets, contenders, seeds = {"churn": 8.0}, ["optuna", "kt_hyperband"], [0]
    if "kt_hyperband" not in contenders:
        p.error("kt_hyperband is the reference: keep it in --contenders")
    if args.report:
        report(args.report, budgets, contenders, seeds)
        return 0
    folder = Path(tempfile.mkdtemp(prefix="search-eff-"))
    storage = f"sqlite:///{folder / 'optuna.db'}"
    from studies.storage import open_storage

    open_storage(storage)  # the schema, before two runs start at once
    print(f"# search efficiency: {', '.join(f'{d} {b:g} s' for d, b in budgets.items())} per run, seeds {seeds}, "
          f"{args.parallel} runs at a time, 1 TF thread each, mlp.yaml (churn: mlp_table.yaml), {EPOCHS} epochs max, "
          f"patience {PATIENCE}")
    print(f"# optuna = {OPTUNA}")
    jobs = []
    for dataset, budget in budgets.items():
        for seed in seeds:
            shift = seed % len(contenders)  # rotate who starts first
            for contender in contenders[shift:] + contenders[:shift]:
                jobs.append((dataset, seed, contender, config(folder, dataset, contender, seed, budget)))
    failures = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for (dataset, seed, contender, _), (code, took, err) in zip(
                jobs, pool.map(lambda job: run(job[3], folder, storage), jobs), strict=True):
            print(f"  ran {dataset:<14} seed {seed} {contender:<24} {took:6.1f} s  exit {code}", flush=True)
            if code != 0:  # told at once; the other runs still count (the tables say which one is cut short)
                failures.append(f"{dataset} {contender} seed {seed}")
                print(f"    its stderr ends:\n{err}", flush=True)
    report(storage, budgets, contenders, seeds)
    if failures:
        print(f"failed runs (their studies end where they failed): {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def cost_model(storage: str, name: str) -> tuple[float, float] | None:
    """Least squares of a trial's duration on the epochs it trained: (seconds per trial, per epoch)."""
    import numpy as np
    import optuna

    pts = [(t.user_attrs["epochs_run"], (t.datetime_complete - t.datetime_start).total_seconds())
           for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
           if t.datetime_complete and "epochs_run" in t.user_attrs]
    if len({e for e, _ in pts}) < 2:
        return None
    slope, intercept = np.polyfit([e for e, _ in pts], [d for _, d in pts], 1)
    return float(intercept), float(slope)


def report(storage: str, budgets: dict[str, float], contenders: list[str], all_seeds: list[int]) -> None:
    import optuna

    have = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    headline, headline_gap = [], []
    for dataset, budget in budgets.items():
        seeds = [s for s in all_seeds if all(f"{dataset}_{c}_s{s}" in have for c in contenders)]
        if seeds != all_seeds:
            print(f"# {dataset}: seeds {sorted(set(all_seeds) - set(seeds))} left out (a contender's study is missing)")
        print(f"\n## {dataset}: budget {budget:g} s of running trials (random_2x: {2 * budget:g} s)")
        curves = {(c, s): evaluate(storage, f"{dataset}_{c}_s{s}", budget * (2 if c == "random_2x" else 1))
                  for c, s in itertools.product(contenders, seeds)}
        reference = {s: curves[("kt_hyperband", s)].final for s in seeds}
        print(f"{'contender':<24} {'trials':>7} {'best val_loss (median, min-max)':>32} {'s to KT-HB best (median)':>26}"
              f"  per seed: best / s to KT-HB best")
        reach: dict[str, list[float | None]] = {}
        for c in contenders:
            bests = [curves[(c, s)].final for s in seeds]
            times = [curves[(c, s)].time_to_reach(reference[s]) for s in seeds]
            reach[c] = times
            trials = statistics.median(len(curves[(c, s)].seconds) for s in seeds)
            reached = sorted(t for t in times if t is not None)
            med_time = statistics.median([t if t is not None else math.inf for t in times])
            per_seed = "  ".join(f"{fmt(b)}/{fmt(t, 3)}" for b, t in zip(bests, times, strict=True))
            spread = f"{fmt(statistics.median(bests))} ({fmt(min(bests))}-{fmt(max(bests))})"
            print(f"{c:<24} {trials:>7g} {spread:>32} {fmt(med_time if math.isfinite(med_time) else None, 3):>20}"
                  f" ({len(reached)}/{len(seeds)})  {per_seed}")
            costs = [m for s in seeds if (m := cost_model(storage, f"{dataset}_{c}_s{s}"))]
            if costs:
                fixed = statistics.median(m[0] for m in costs)
                per_epoch = statistics.median(m[1] for m in costs)
                print(f"{'':<24} trial duration ~ {fixed:.2f} s + {per_epoch:.3f} s x epochs (median fit over seeds)")
        # The whole curve, not one moment: each contender's best so far, its average distance over the
        # budget from the seed's best final value (any contender's), before its first value the
        # distance of the seed's worst first value.
        gaps: dict[str, list[float]] = {c: [] for c in contenders}
        for s in seeds:
            mine = [curves[(c, s)] for c in contenders]
            finals = [c.final for c in mine if not math.isnan(c.final)]
            firsts = [next(v for v in c.best if not math.isnan(v)) for c in mine if not math.isnan(c.final)]
            if not finals:
                continue
            for c in contenders:
                gaps[c].append(curves[(c, s)].mean_gap(min(finals), max(firsts), budget * (2 if c == "random_2x" else 1)))
        if gaps["kt_hyperband"]:
            print("mean distance of the best so far from the seed's best, over the budget (median over seeds; "
                  "per seed): " + "; ".join(f"{c} {statistics.median(g):.4g} ({', '.join(f'{x:.3g}' for x in g)})"
                                            for c, g in gaps.items()))
            if "optuna" in gaps:
                shares = [o / k if k > 0 else math.inf for o, k in zip(gaps["optuna"], gaps["kt_hyperband"], strict=True)]
                print(f"optuna / KT-HB mean distance, per seed: {', '.join(f'{x:.3g}' for x in shares)}; "
                      f"median {statistics.median(shares):.3g}")
                headline_gap.append(f"{dataset} {statistics.median(shares):.3g}")
        ratios = []
        for i in range(len(seeds)):
            ours, theirs = reach["optuna"][i] if "optuna" in reach else None, reach["kt_hyperband"][i]
            if theirs:
                ratios.append((ours if ours is not None else math.inf) / theirs)
        if ratios:
            med = statistics.median(ratios)
            headline.append(f"{dataset} {fmt(med if math.isfinite(med) else None, 3)}")
            print(f"optuna / KT-HB time to KT-HB's best, per seed: {', '.join(fmt(r if math.isfinite(r) else None, 3) for r in ratios)}")
    print(f"\nover the whole budget: optuna's / KT Hyperband's mean distance from the seed's best (median over seeds): "
          f"{'; '.join(headline_gap)}")
    print(f"headline: optuna time to reach KT Hyperband's best / KT Hyperband's time (median over seeds): "
          f"{'; '.join(headline)}")


if __name__ == "__main__":
    sys.exit(main())
