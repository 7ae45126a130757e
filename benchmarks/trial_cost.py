"""Where a small trial's time goes: the shipped breast_cancer MLP, 3-epoch trials.

    python benchmarks/trial_cost.py [--trials 24] [--rounds 5]

Part 1, the fit path in one process, the same seeded models alternately fitted the way Keras
does by default ("before": arrays batched by Keras, so the smaller last batch traces the train
step again; optimizer variables created inside the first trace, which traces it twice; the
compiled metrics computed on every train batch), the way models.training.fit did through
Keras's train step, traced for each model ("keras"), and the way it does now, each epoch one call
of the epoch function its structure shares with the models fitted before it (models.shared_step,
traced in the warm-up round; each model seeded as a trial seeds it, models.runtime.fresh_keras):
first epoch (tracing included), steady epoch, whole 3-epoch fit. (Once models.training.fit has
run, Grappler's graph rewrites are off in the process, for both ways: the difference shown is the
fit path's alone.) Then the memory the process keeps per fitted model, both ways (Keras's
one-replica all-reduce kept every traced train step alive; models.updates.direct_updates).

Then the floor under a trial: the shipped sampler and storage with no model, bare and with
the probe's one burst a trial pays for its serving costs, against three steady epochs.

Part 2, whole trials of `python -m studies.run configs/breast_cancer.yaml` (3 epochs, no pruner,
one TensorFlow thread) with tracking on (embedded MLflow) and off, and off again in the same
project folder (every structure then loaded from the trace cache), from each trial's own record
(`setup_seconds`, `epoch_seconds`, start/complete times): time outside epochs per trial, a trial
against three steady epochs of pure training, and each invocation's fixed cost (process wall
minus the trials); over all trials, and over the trials whose structure an earlier trial traced
(a study of a few hundred trials traces a few dozen at most). Goals (issue 18): outside epochs
<= 0.3 s, trial <= 2x three epochs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARAMS = {"n_layers": 2, "units": [64, 32], "dropout": [0.1, 0.1], "activation": "relu", "batch_norm": False,
          "l2": 1e-5, "optimizer": "adam", "learning_rate": 1e-3}


def fit_path(rounds: int) -> None:
    from models.runtime import import_tensorflow

    import_tensorflow(1)
    import keras

    from models import FAMILIES, load_dataset
    from models.runtime import fresh_keras
    from models.training import _Clock, _Validation, fit

    data = load_dataset(name="breast_cancer", path=None, target=None, features=None, task="binary", image_shape=None,
                        validation=0.2, test=0.2, seed=42, columns=None)

    def before(model: keras.Model) -> list[float]:
        clock = _Clock()
        model.fit(data.x_train, data.y_train, epochs=3, batch_size=64, shuffle=True, verbose=0,
                  callbacks=[clock, _Validation(data.x_val, data.y_val)])
        return clock.seconds

    def keras_step(model: keras.Model) -> list[float]:
        return fit(model, data, epochs=3, batch_size=64, shared=False).extras["epoch_seconds"]

    def now(model: keras.Model) -> list[float]:
        return fit(model, data, epochs=3, batch_size=64).extras["epoch_seconds"]

    ways = {"before": before, "keras": keras_step, "now": now}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
    for r in range(rounds + 1):  # round 0 warms up all three (and traces the shared step of PARAMS' structure)
        for name, run in (list(ways.items()) if r % 2 else list(ways.items())[::-1]):
            fresh_keras(r)  # as a trial starts (studies.engines.objective)
            model = FAMILIES["mlp"].build(PARAMS, data.spec)
            start = time.perf_counter()
            epochs = run(model)
            total = time.perf_counter() - start
            if r:
                results[name].append((epochs[0], statistics.median(epochs[1:]), total))
    print(f"fit path, 3 epochs, median of {rounds} alternating rounds (1 TF thread):")
    print(f"  {'':8} {'first epoch':>12} {'steady epoch':>13} {'3-epoch fit':>12} {'fit / 3 steady':>15}")
    med = {}
    for name, rows in results.items():
        first, steady, total = (statistics.median(col) for col in zip(*rows, strict=True))
        med[name] = total
        print(f"  {name:8} {first:11.3f}s {steady:12.3f}s {total:11.3f}s {total / (3 * steady):14.1f}x")
    print(f"  the 3-epoch fit now takes {med['now'] / med['before']:.2f}x the time it took before "
          f"({med['before'] / med['now']:.2f}x faster), {med['now'] / med['keras']:.2f}x the time of the same fit "
          f"through Keras's step ({med['keras'] / med['now']:.2f}x faster)")
    memory_kept(data, {"now": now, "keras": keras_step, "before": before})
    steady_now = statistics.median(row[1] for row in results["now"])
    floor(data, 3 * steady_now)


def floor(data, three_epochs: float, n: int = 24) -> None:
    """The floor under a trial (BENCHMARKING.md): the shipped config's sampler (TPE, multivariate,
    grouped) and the workbench's SQLite storage, an objective that draws the search space's
    parameters, reports three epochs and returns a value the parameters decide, no model; then
    the same with the one burst of POST /predict each trial pays for its serving costs."""
    import hashlib
    import json

    import optuna

    from models import FAMILIES
    from search_spaces import optuna_suggest, sample
    from serving.probe import serving_costs
    from studies.config.loader import load_config
    from studies.config.samplers import build_sampler
    from studies.storage.rdb import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's `group`
    loaded = load_config(ROOT / "configs" / "breast_cancer.yaml")
    network = FAMILIES["mlp"].build(PARAMS, data.spec)

    def study_of(name: str, tmp: str, probe: bool) -> list[float]:
        study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp}/floor.db"), study_name=name,
                                    sampler=build_sampler(loaded.config.sampler, 42, loaded.space, str(loaded.space_path)))

        def objective(trial: optuna.Trial) -> float:
            params = sample(loaded.space, optuna_suggest(trial))
            digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).digest()
            value = int.from_bytes(digest[:4], "big") / 2**32
            for epoch in range(3):
                trial.report(value + (2 - epoch) * 0.01, epoch)
            if probe:
                trial.set_user_attr("latency_p50_ms", serving_costs(network, data.spec, data.x_val[:64])["latency_p50_ms"])
            return value

        study.optimize(objective, n_trials=n)
        return [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials(deepcopy=False)]

    walls: dict[str, list[float]] = {"bare": [], "with the probe's burst": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(2):
            for i, (label, probe) in enumerate((("bare", False), ("with the probe's burst", True))):
                walls[label].append(statistics.median(study_of(f"floor{r}{i}", tmp, probe)))
    print(f"floor under a trial ({n} trials of the shipped sampler on the workbench's SQLite storage, no model; "
          f"median trial, 2 rounds):")
    for label, values in walls.items():
        wall = statistics.median(values)
        print(f"  {label:24} {wall * 1000:6.1f} ms = {wall / three_epochs:.1f}x three steady epochs ({three_epochs * 1000:.1f} ms)")


def memory_kept(data, ways: dict, fits: int = 30) -> None:
    """What a process keeps per fitted model (a study fits hundreds), after 5 fits of each way;
    "now" first, so that what "before" keeps cannot count against it."""
    import gc

    from models import FAMILIES
    from models.runtime import fresh_keras

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    print(f"memory kept per fitted model ({fits} fits after 5 of each way; RSS, and Python objects after a full collection):")
    for name, run in ways.items():
        rss, objects = 0.0, 0
        for i in range(5 + fits):
            if i == 5:
                gc.collect()
                rss, objects = rss_mib(), len(gc.get_objects())
            fresh_keras(i)
            run(FAMILIES["mlp"].build(PARAMS, data.spec))
        gc.collect()
        print(f"  {name:8} {(rss_mib() - rss) * 1024 / fits:7.0f} KiB {(len(gc.get_objects()) - objects) / fits:8.0f} objects")


def trials(n: int) -> None:
    import optuna

    with tempfile.TemporaryDirectory() as on, tempfile.TemporaryDirectory() as off:
        # The third study runs in the second's project folder: every structure it meets, the second
        # traced and left in the trace cache (models.trace_cache), as a user's next study finds them.
        for tracking, tmp, name in (("on", on, "cost"), ("off", off, "cost"), ("off, the trace cache warm", off, "again")):
            env = {**os.environ, "WORKBENCH_HOME": tmp, "TF_THREADS": "1", "OMP_NUM_THREADS": "1"}
            env.pop("MLFLOW_TRACKING_URI", None)
            env.pop("OPTUNA_STORAGE", None)
            env.pop("TRACE_CACHE", None)
            storage = f"sqlite:///{tmp}/optuna.db"
            cmd = [sys.executable, "-m", "studies.run", "configs/breast_cancer.yaml", "--storage", storage,
                   "--study-name", name, "--n-trials", str(n), "--set", "training.epochs=3",
                   "--set", "training.early_stopping_patience=null", "--set", "pruner.type=none",
                   *(["--no-tracking"] if tracking != "on" else ["--set", "registry.model_name=cost"])]
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            study = optuna.load_study(study_name=name, storage=storage)
            if tracking == "on":
                served_latency(study, f"sqlite:///{tmp}/mlflow.db")
            report(f"tracking {tracking}", n, study.get_trials(deepcopy=False), wall)


def report(label: str, n: int, done: list, wall: float) -> None:
    rows, traced = [], {}
    for t in done:
        seconds = t.user_attrs["epoch_seconds"]
        trial_wall = (t.datetime_complete - t.datetime_start).total_seconds()
        steady = statistics.median(seconds[1:])
        rows.append((trial_wall, trial_wall - sum(seconds), seconds[0] - steady, steady, t.user_attrs["setup_seconds"]))
        traced.setdefault(t.user_attrs.get("train_step", "?"), []).append(rows[-1])
    print(f"\nwhole trials, {label}: {n} trials, median per trial")
    print("  by train step: " + "; ".join(f"{step}: {len(group)} trials, median {statistics.median(r[0] for r in group):.3f}s"
                                          for step, group in sorted(traced.items())))
    for title, group in (("all trials", rows), ("trials of a structure traced before", traced.get("shared", []))):
        if not group:
            continue
        trial_wall, outside, trace, steady, setup = (statistics.median(col) for col in zip(*group, strict=True))
        print(f"  {title} ({len(group)}): trial {trial_wall:.3f}s = epochs {trial_wall - outside:.3f}s + outside epochs "
              f"{outside:.3f}s (setup {setup:.3f}s: the build, and the serving costs where a constraint names one; "
              "serving costs, evaluation, storage and tracking the rest)")
        print(f"    first epoch's extra over a steady one {trace:.3f}s; steady epoch {steady:.4f}s; "
              f"trial / three steady epochs = {trial_wall / (3 * steady):.1f}x (goal <= 2x); "
              f"outside epochs {outside:.3f}s (goal <= 0.3 s)")
    print(f"  invocation {wall:.1f}s, of which outside the trials {wall - sum(r[0] for r in rows):.1f}s "
          f"(imports, data, storage, tracking start and end); all its trials {sum(r[0] for r in rows):.1f}s")


def served_latency(study, tracking_uri: str) -> None:
    """The registered winner's latency as its trial recorded it (POST /predict on the API in a
    thread of the study's process: serving.probe) against the same model served for real:
    `python -m serving` in its own process, timed by the same client process, 5 alternating
    rounds of the served process and a fresh probe in this process."""
    import socket
    import urllib.request

    import numpy as np

    from models import load_dataset
    from serving.model import load
    from serving.probe import RemoteClient, ServingProbe, predict_bodies
    from serving.store import Store

    model = load("models:/cost@champion", Store(tracking_uri))
    trial = study.trials[int(model.resolved.tags["workbench.trial_number"])]
    recorded = trial.user_attrs["latency_p50_ms"]
    confirmed = float(model.resolved.tags["workbench.latency_p50_ms"])  # measured again when it was registered
    data = load_dataset(name="breast_cancer", path=None, target=None, features=None, task="binary", image_shape=None,
                        validation=0.2, test=0.2, seed=42, columns=None)
    one, batch = predict_bodies(data.x_val[:64], model.table)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "SERVING_MODEL_URI": "models:/cost@champion",
           "SERVING_PORT": str(port), "SERVING_ACCESS_LOG": "false", "TF_THREADS": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "serving"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    served, probed = [], []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the served model did not answer") from None
                time.sleep(0.2)
        client = RemoteClient("127.0.0.1", port)
        for _ in range(5):
            served.append(client.medians_ms("/predict", [one, batch], 1.0, 1000)[0])
            probe = ServingProbe()
            probed.append(probe.measure(model, one, batch, budget_seconds=1.0, max_calls=1000).p50_ms)
            probe.close()
        client.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    served_p50, probed_p50 = float(np.median(served)), float(np.median(probed))
    print(f"\nserving latency of the registered trial {trial.number}: recorded latency_p50_ms {recorded:.3f} ms "
          f"(the trial's probe: one burst); measured again at registration {confirmed:.3f} ms (the version's tag: "
          f"7 bursts); the registered model on a fresh probe {probed_p50:.3f} ms; "
          f"served by python -m serving {served_p50:.3f} ms (rounds {', '.join(f'{v:.3f}' for v in served)}): "
          f"served/recorded = {served_p50 / recorded:.2f}x, served/registered = {served_p50 / confirmed:.2f}x, "
          f"served/probe = {served_p50 / probed_p50:.2f}x (goal: within 1.2x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    fit_path(args.rounds)
    trials(args.trials)


if __name__ == "__main__":
    main()
