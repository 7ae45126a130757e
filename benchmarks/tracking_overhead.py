"""Tracking overhead: the same seeded study with tracking off, with our tracker, and with a naive
per-call MLflow logger (the "before": log_metric per epoch, log_param per param, a model logged
synchronously every trial), against the real MLflow server + S3 endpoint.

    scripts/stack.sh up mlflow && eval "$(scripts/stack.sh env --tests)"
    MLFLOW_TRACKING_URI=$WORKBENCH_TEST_MLFLOW_URI python benchmarks/tracking_overhead.py [--quick]

Modes alternate within one invocation (off, ours, naive, off, ours, naive, ...) after a warm-up;
each study runs in a fresh process (same imports, no state carried between modes) with one
TensorFlow thread; its wall time is measured around the runner, TensorFlow import included. Prints per-round wall times, medians, HTTP requests per
trial, and the headline ratio ours/off.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies import tracking  # noqa: E402
from studies.engines import runner  # noqa: E402
from studies.run import main  # noqa: E402
from studies.tracking.names import RUN_STATUS  # noqa: E402

HTTP_CALLS = [0]


def count_http() -> None:
    import requests

    original = requests.Session.request

    def counted(self, *args, **kwargs):
        HTTP_CALLS[0] += 1
        return original(self, *args, **kwargs)

    requests.Session.request = counted


class NaiveTracker(tracking.Tracker):
    """What people write first: one request per metric, param and tag, model upload inline."""

    def start_trial(self, trial, params, tags=None):
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}",
                                     tags={"mlflow.parentRunId": self.parent_run_id})
        for key, value in tracking.flatten_params(params).items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def log_epoch(self, run_id, epoch, logs):
        for key, value in logs.items():
            self.client.log_metric(run_id, key, value, step=epoch)

    def end_trial(self, run_id, *, state, metrics, tags, model=None, spec=None, is_best=False):
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)
        for key, value in {**self.common_tags, **tags, "optuna.state": state}.items():
            self.client.set_tag(run_id, key, value)
        if model is not None and state == "COMPLETE":
            path = tracking.save_model(model, spec, tags)
            self.client.log_artifacts(run_id, str(path), "model")
        self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))


def child(mode: str, config: str, n_trials: int, epochs: int, workdir: str) -> int:
    """Run one study in this (fresh) process; print its wall time and HTTP request count as JSON."""
    count_http()
    name = f"bench_{mode}_{uuid.uuid4().hex[:8]}"
    argv = [config, "--storage", f"sqlite:///{Path(workdir) / 'optuna.db'}", "--study-name", name,
            "--n-trials", str(n_trials), "--set", f"training.epochs={epochs}", "--set", "pruner={type: none}",
            "--set", "training.early_stopping_patience=null", "--set", "tracking.log_models=best", "--no-register"]
    if mode == "off":
        argv.append("--no-tracking")
    if mode == "naive":
        runner.Tracker = NaiveTracker  # the tracker the runner starts
    out = SummaryClock()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    elapsed = time.perf_counter() - started
    to_summary = (out.at or time.perf_counter()) - started
    import optuna

    trials = optuna.load_study(study_name=name, storage=argv[2]).trials
    in_trials = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete)
    print(json.dumps({"code": code, "seconds": elapsed, "to_summary": to_summary, "trial_seconds": in_trials,
                      "http": HTTP_CALLS[0]}))
    return code


class SummaryClock(io.StringIO):
    """Swallows the runner's output and notes when its summary (the line `wall time`) was written."""

    at: float | None = None

    def write(self, text: str) -> int:
        if self.at is None and "wall time" in text:
            self.at = time.perf_counter()
        return super().write(text)


def run_once(mode: str, config: str, n_trials: int, epochs: int, workdir: Path) -> tuple[float, float, float, int]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--config", config, "--trials", str(n_trials),
                          "--epochs", str(epochs), "--workdir", str(workdir)], capture_output=True, text=True)
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}") from None
    if result["code"] != 0:
        raise SystemExit(f"{mode} run failed with exit code {result['code']}:\n{out.stderr[-3000:]}")
    return result["seconds"], result["to_summary"], result["trial_seconds"], result["http"]


def main_bench() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 trials, 2 epochs, no warm-up")
    parser.add_argument("--config", default=str(ROOT / "configs" / "breast_cancer.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--child", choices=("off", "ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.config, args.trials, args.epochs, args.workdir)
    if args.quick:
        args.rounds, args.trials, args.epochs = 1, 2, 2
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        print("MLFLOW_TRACKING_URI must point at the MLflow server (scripts/stack.sh up mlflow)", file=sys.stderr)
        return 2
    modes = ("off", "ours", "naive")
    times: dict[str, list[float]] = {m: [] for m in modes}
    to_summary: dict[str, list[float]] = {m: [] for m in modes}
    trial_times: dict[str, list[float]] = {m: [] for m in modes}
    calls: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.quick:  # warm-up: file caches, the server's connection pool
            run_once("ours", args.config, 1, 1, workdir)
        for round_no in range(args.rounds):
            for mode in modes:
                seconds, until_summary, in_trials, n_calls = run_once(mode, args.config, args.trials, args.epochs, workdir)
                times[mode].append(seconds)
                to_summary[mode].append(until_summary)
                trial_times[mode].append(in_trials)
                calls[mode].append(n_calls / args.trials)
                print(f"round {round_no + 1} {mode:<6} invocation {seconds:7.2f} s  summary at {until_summary:7.2f} s  "
                      f"inside trials {in_trials:7.2f} s  "
                      f"{n_calls / args.trials:6.1f} HTTP requests/trial", flush=True)
    print(f"\nstudy: {args.trials} trials x {args.epochs} epochs, no pruning, breast_cancer MLP, "
          f"1 TF thread (TF_THREADS=1, OMP_NUM_THREADS=1), {args.rounds} rounds, server {uri}")
    print(f"{'mode':<6} {'invocation s (median, min-max)':>31} {'trials s (median, min-max)':>28} {'HTTP/trial':>10}")
    for mode in modes:
        t, tt = times[mode], trial_times[mode]
        print(f"{mode:<6} {statistics.median(t):13.2f} ({min(t):6.2f}-{max(t):6.2f})    "
              f"{statistics.median(tt):12.2f} ({min(tt):6.2f}-{max(tt):6.2f}) {statistics.median(calls[mode]):10.1f}")
    off, off_trials = statistics.median(times["off"]), statistics.median(trial_times["off"])
    fixed = (statistics.median(times["ours"]) - statistics.median(trial_times["ours"])) - (off - off_trials)
    print(f"naive/off: trials {statistics.median(trial_times['naive']) / off_trials:.3f}, "
          f"invocation {statistics.median(times['naive']) / off:.3f}")
    before = (statistics.median(to_summary["ours"]) - statistics.median(trial_times["ours"])) - (
        statistics.median(to_summary["off"]) - off_trials)
    print(f"ours per-invocation fixed cost (MLflow import, parent run, summary, plotly report): {fixed:+.2f} s; "
          f"of it before the summary is printed (the critical path; goal <= 2 s): {before:+.2f} s")
    print(f"ours/off: invocation {statistics.median(times['ours']) / off:.3f}; "
          f"trial wall time {statistics.median(trial_times['ours']) / off_trials:.3f} (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
