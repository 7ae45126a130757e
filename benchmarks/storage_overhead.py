"""Storage (and tracking) overhead per trial as a PostgreSQL study grows, with 1 and 16 workers.

    scripts/stack.sh up mlflow && eval "$(scripts/stack.sh env --tests)"
    python benchmarks/storage_overhead.py [--quick] [--trials 5000] [--workers 1,16] [--tracking]

A trial here trains nothing and never sleeps: it samples the MLP search space, reports 10 epochs
(report + should_prune, median pruner), writes the user attributes a real trial writes, and
ends. Two contenders run the same work side by side, alternating, on fresh studies:

- ours:    the workbench's own path (studies.engines.objective.Objective with its training step replaced,
           the resilient RDB storage with a heartbeat thread, our callbacks, optional MLflow tracker);
- vanilla: plain Optuna on the same URL (`optuna.create_study(storage=url)`), the same calls.

Each worker is a separate process. Per window of 100 trials ending at 100, 1,000, 5,000
trials the script prints the study's wall time per trial (1 / throughput) and the median
trial duration one worker sees, plus the most PostgreSQL connections the study held at once.
Sampler: random, so the figure is the storage's, not TPE's (whose own cost grows with the
study; --sampler tpe measures that too).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPOCHS = 10
DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/optuna"


def _values(params: dict, epoch: int) -> float:
    """A deterministic learning curve from the params: some trials are pruned, as in real studies."""
    lr = float(params.get("learning_rate", 0.01))
    return 1.0 / (1 + epoch) + abs(lr - 0.01) * 10


def child(mode: str, url: str, study_name: str, target: int, go: Path, sampler: str, tracking_uri: str | None) -> None:
    import optuna

    from search_spaces import optuna_suggest, sample
    from studies.cli import quiet_libraries
    from studies.config import load_config
    from studies.engines.objective import Objective
    from studies.storage.study import BUDGET_STATES

    quiet_libraries()
    loaded = load_config(str(ROOT / "configs" / "breast_cancer.yaml"), [f"sampler.type={sampler}", "sampler.options={}"])
    states = tuple(optuna.trial.TrialState[s] for s in BUDGET_STATES)
    sampler_obj = optuna.samplers.RandomSampler() if sampler == "random" else optuna.samplers.TPESampler(constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
    if mode == "vanilla":
        study = optuna.load_study(study_name=study_name, storage=url, sampler=sampler_obj, pruner=pruner)

        def objective(trial):
            params = sample(loaded.space, optuna_suggest(trial))
            trial.set_user_attr("seed", trial.number)
            for epoch in range(EPOCHS):
                trial.report(_values(params, epoch), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            for key in ("n_params", "epochs_run", "fit_seconds", "best_epoch", "val_loss", "val_accuracy",
                        "test_loss", "test_accuracy"):
                trial.set_user_attr(key, 1.0)
            return _values(params, EPOCHS)

        callbacks = [optuna.study.MaxTrialsCallback(target, states=states)]
    else:
        from types import SimpleNamespace

        from studies.config.samplers import read_completed_once_per_trial
        from studies.storage import open_storage
        from studies.storage.study import improves

        storage = open_storage(url, heartbeat_interval=30, max_retry=2)
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler_obj,
                                  pruner=read_completed_once_per_trial(pruner))
        tracker = None
        if tracking_uri:
            from studies.tracking import Tracker, close_stale_run

            tracker = Tracker(tracking_uri, study_name, artifact_location=None, log_models="none", flush_seconds=10)
            tracker.start_study(study, loaded, data_hash="bench", storage_url="bench")
            storage.get_heartbeat_stale_trial_callback().on_stale = functools.partial(close_stale_run, tracker)

        class NoTraining(Objective):
            def _train(self, trial, params, seed, run_id, outcome, **_options):
                for epoch in range(EPOCHS):
                    value = _values(params, epoch)
                    if self.tracker is not None:
                        self.tracker.log_epoch(run_id, epoch, {"loss": value, "val_loss": value})
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned()
                outcome.attrs.update(dict.fromkeys(("n_params", "epochs_run", "fit_seconds", "best_epoch", "val_loss",
                                                       "val_accuracy", "test_loss", "test_accuracy"), 1.0))
                value = _values(params, EPOCHS)
                outcome.metrics.update({"best_val_loss": value})
                improves(trial.study, value)
                return value

        objective = NoTraining(loaded, SimpleNamespace(spec=None), tracker, storage=storage)
        callbacks = [optuna.study.MaxTrialsCallback(target, states=states)]
    while not go.exists():
        time.sleep(0.01)
    try:
        study.optimize(objective, n_trials=target, callbacks=callbacks, gc_after_trial=False)
    finally:
        if mode == "ours" and tracker is not None:
            tracker.close()


def connections(url: str, stop: threading.Event, peak: list[int]) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    while not stop.is_set():
        with engine.connect() as conn:
            n = conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )).scalar()
        peak[0] = max(peak[0], int(n))
        stop.wait(0.25)
    engine.dispose()


def run(mode: str, url: str, workers: int, target: int, sampler: str, tracking_uri: str | None) -> dict:
    import optuna

    name = f"bench_storage_{mode}_{workers}_{uuid.uuid4().hex[:6]}"
    optuna.create_study(study_name=name, storage=url)
    go = Path(tempfile.mkdtemp()) / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, "--url", url, "--study", name, "--trials",
                               str(target), "--sampler", sampler, *(["--tracking-uri", tracking_uri] if tracking_uri else []),
                               "--go", str(go)], env=env) for _ in range(workers)]
    time.sleep(3.0 + 0.3 * workers)  # imports, storage and tracker set-up: not part of the figure
    stop, peak = threading.Event(), [0]
    sampler_thread = threading.Thread(target=connections, args=(url, stop, peak), daemon=True)
    sampler_thread.start()
    start = time.time()
    go.touch()
    for p in procs:
        p.wait()
    wall = time.time() - start
    stop.set()
    sampler_thread.join()
    if any(p.returncode for p in procs):
        raise SystemExit(f"{mode}: a worker failed")
    study = optuna.load_study(study_name=name, storage=url)
    done = sorted((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()), key=lambda t: t.datetime_complete)
    result = {"mode": mode, "workers": workers, "trials": len(done), "wall": wall, "connections": peak[0], "windows": {}}
    for size in sorted({min(n, target) for n in (100, 1000, 5000)}):
        window = done[max(0, size - 100):size]
        if len(window) < 20:
            continue
        span = (window[-1].datetime_complete - window[0].datetime_complete).total_seconds()
        per_trial = span / (len(window) - 1) * 1000
        latency = statistics.median((t.datetime_complete - t.datetime_start).total_seconds() * 1000 for t in window)
        result["windows"][size] = (per_trial, latency)
    optuna.delete_study(study_name=name, storage=url)
    return result


def main_bench() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 trials, workers 1 and 4")
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--workers", default="1,16")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (ours, vanilla, ...)")
    parser.add_argument("--sampler", choices=("random", "tpe"), default="random")
    parser.add_argument("--tracking", action="store_true", help="also log every trial to $WORKBENCH_TEST_MLFLOW_URI (ours only)")
    parser.add_argument("--url", default=os.environ.get("WORKBENCH_TEST_POSTGRES_URL", DEFAULT_URL))
    parser.add_argument("--child", choices=("ours", "vanilla"), help=argparse.SUPPRESS)
    parser.add_argument("--study", help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url, args.study, args.trials, Path(args.go), args.sampler, args.tracking_uri)
        return 0
    if args.quick:
        args.trials, args.workers = 60, "1,4"
    tracking_uri = os.environ.get("WORKBENCH_TEST_MLFLOW_URI", "http://127.0.0.1:5000") if args.tracking else None
    counts = [int(w) for w in args.workers.split(",")]
    print(f"PostgreSQL {args.url.split('@')[-1]}; {args.trials} trials per study; sampler {args.sampler}; "
          f"{EPOCHS} reports per trial; tracking {'on (ours)' if tracking_uri else 'off'}; {os.cpu_count()} cores")
    results = []
    for _ in range(args.rounds):
        for workers in counts:
            for mode in ("ours", "vanilla"):
                r = run(mode, args.url, workers, args.trials, args.sampler, tracking_uri if mode == "ours" else None)
                results.append(r)
                cells = "  ".join(f"@{n}: {w:6.1f} ms/trial (trial {lat:6.1f} ms)" for n, (w, lat) in r["windows"].items())
                print(f"{mode:<8} workers {workers:>2}  {cells}  peak connections {r['connections']}  wall {r['wall']:.1f} s",
                      flush=True)
    print("\nmedians over rounds: study wall time per trial (ms), ours / vanilla")
    headline = []
    for workers in counts:
        for size in sorted({n for r in results for n in r["windows"]}):
            ours = [r["windows"][size][0] for r in results if r["mode"] == "ours" and r["workers"] == workers and size in r["windows"]]
            van = [r["windows"][size][0] for r in results if r["mode"] == "vanilla" and r["workers"] == workers and size in r["windows"]]
            if ours and van:
                o, v = statistics.median(ours), statistics.median(van)
                headline.append((workers, size, o, o / v))
                print(f"  workers {workers:>2}  at {size:>5} trials: ours {o:6.1f}  vanilla {v:6.1f}  ratio {o / v:.2f}")
    conns = max((r["connections"] for r in results if r["mode"] == "ours"), default=0)
    worst = max(headline, key=lambda h: h[2]) if headline else None
    if worst:
        print(f"headline: worst ours {worst[2]:.1f} ms/trial (workers {worst[0]}, at {worst[1]} trials; goal <= 50), "
              f"peak PostgreSQL connections {conns} (server limit 100)")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
