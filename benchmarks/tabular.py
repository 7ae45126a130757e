"""Mixed-type table benchmark, side by side in one run (one TensorFlow thread, OMP_NUM_THREADS=1).

A generated table (default 200,000 rows: 10 numeric columns with 5% missing, 5 categorical columns
of 3, 10, 50, 300 and 1,000 levels, 1 boolean; binary target):

  Trial   time per Optuna trial of a fixed MLP, 5 epochs, through the workbench's objective on the
          table (encoded once when the study loads its data) vs the same network trained with
          Keras's own fit on the same rows already encoded into numpy arrays (the peer never pays
          for preprocessing). Goal: ours <= 1.15x.
  HTTP    one raw record (strings, a null) to `POST /predict` of the registered table model vs the
          no-op endpoint of benchmarks/serving.py, 8 keep-alive connections. Goals: req/s >= 0.45x,
          p50 <= 1.6x the no-op's.
  Batch   rows/s scoring the raw table in memory (encoding + forward pass, 100k-row chunks) vs the
          same network's forward pass on the pre-encoded array (the floor). Goal: >= 0.5x.

    python benchmarks/tabular.py [--quick] [--rows N]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_serving", Path(__file__).with_name("serving.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # its HTTP client, servers and THREADS settings (applied on import)
# numpy after them: OpenBLAS reads OMP_NUM_THREADS once, when numpy loads (imported first, this
# process's in-memory scoring ran on two BLAS threads while the docstring promised one).
import numpy as np  # noqa: E402

LEVELS = (3, 10, 50, 300, 1000)
PARAMS = {"n_layers": 2, "units": 64, "optimizer": "adam", "learning_rate": 1e-3, "batch_size": 256}


def make_table(rows: int, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f"num_{i}": rng.normal(i, 1 + i, rows) for i in range(10)})
    logit = 0.3 * frame["num_0"] - 0.1 * frame["num_3"]
    for i, n in enumerate(LEVELS):
        weights = 1.0 / np.arange(1, n + 1) ** 1.1
        codes = rng.choice(n, rows, p=weights / weights.sum())
        frame[f"cat_{i}"] = np.array([f"c{i}_{k}" for k in range(n)], dtype=object)[codes]
        logit += np.sin(codes) * 0.5
    frame["flag"] = rng.random(rows) < 0.3
    logit += 0.8 * frame["flag"]
    for i in range(10):
        frame.loc[rng.random(rows) < 0.05, f"num_{i}"] = np.nan
    frame["target"] = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit.to_numpy())), "yes", "no")
    return frame


def trial_times(loaded, data, epochs: int, rounds: int) -> dict[str, list[float]]:
    """Alternating ours / peer trial times after one warm-up each."""
    import keras
    import optuna

    from models import FAMILIES
    from models.datasets import DataSpec
    from studies.engines.objective import Objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The peer trains on the very arrays the study holds: the same rows, already encoded, in numpy.
    x_tr, y_tr, x_va, y_va = data.x_train, data.y_train, data.x_val, data.y_val
    width = x_tr.shape[1]
    spec = DataSpec("binary", tuple(f"x{i}" for i in range(width)), ("no", "yes"), None, (0.0,) * width, (1.0,) * width)
    objective = Objective(loaded, data)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def ours() -> float:
        study.optimize(objective, n_trials=1)
        t = study.trials[-1]
        assert t.state.name == "COMPLETE", t.user_attrs.get("fail_reason")
        return (t.datetime_complete - t.datetime_start).total_seconds()

    def peer() -> float:
        start = time.perf_counter()
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = FAMILIES["mlp"].build(PARAMS, spec)
        model.fit(x_tr, y_tr, epochs=epochs, batch_size=PARAMS["batch_size"], validation_data=(x_va, y_va), verbose=0)
        model.evaluate(x_va, y_va, verbose=0)
        return time.perf_counter() - start

    ours(), peer()  # warm-up: TensorFlow's first trace, allocator
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for _ in range(rounds):
        times["ours"].append(ours())
        times["peer"].append(peer())
    return times


def http(model_dir: Path, record: dict, seconds: float, rounds: int, quick: bool) -> dict[str, dict[str, float]]:
    names = ("ours", "noop")
    ports = {n: bench.free_port() for n in names}
    servers = {n: bench.start(n, ports[n], model_dir) for n in names}
    body = {"ours": json.dumps({"records": [record]}).encode(), "noop": b'{"instances": [[0.0]]}'}
    raws = {n: (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{ports[n]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body[n])}\r\n\r\n").encode() + body[n] for n in names}
    stats: dict[str, dict[str, list[float]]] = {n: {"rps": [], "p50": [], "server_cpu": [], "client_cpu": []} for n in names}
    try:
        for n in names:
            asyncio.run(bench.throughput(ports[n], raws[n], 8, 1.0))
        for _ in range(rounds):
            for n in names:
                lat = asyncio.run(bench.latencies(ports[n], raws[n], 200 if quick else 1000))
                cpu0, client0 = bench.cpu_seconds(servers[n]), time.process_time()
                done, errors = asyncio.run(bench.throughput(ports[n], raws[n], 8, seconds))
                if errors:
                    raise SystemExit(f"{n}: {errors} non-200 answers")
                stats[n]["rps"].append(done / seconds)
                stats[n]["p50"].append(statistics.median(lat))
                stats[n]["server_cpu"].append(bench.cpu_seconds(servers[n]) - cpu0)
                stats[n]["client_cpu"].append(time.process_time() - client0)
    finally:
        for proc in servers.values():
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    return {n: {k: statistics.median(v) for k, v in s.items()} for n, s in stats.items()}


def batch(model_dir: Path, frame, rounds: int) -> dict[str, float]:
    from serving.model import from_directory
    from serving.store import ResolvedModel

    model = from_directory(model_dir, ResolvedModel(str(model_dir), None, None, None, None))
    raw = frame.drop(columns=["target"])
    encoded = model.table.encode(raw)
    chunk = 100_000
    rates: dict[str, list[float]] = {"ours": [], "floor": []}
    for i in range(0, len(raw), chunk):  # warm-up: first-touch page faults, BLAS buffers
        model.predict_arrays(model.table.encoded(raw.iloc[i:i + chunk])[0])
    for _ in range(rounds + 1):
        start = time.perf_counter()
        for i in range(0, len(raw), chunk):  # as batch scoring does (serving.batch.scoring.model_inputs)
            rows, _ = model.table.encoded(raw.iloc[i:i + chunk])
            model.predict_arrays(rows)
        rates["ours"].append(len(raw) / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(0, len(raw), chunk):
            model.predict_arrays(encoded[i:i + chunk])
        rates["floor"].append(len(raw) / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20k rows, 1 epoch, 1 round, short windows")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.epochs, args.rounds, args.seconds = 20_000, 1, 1, 1.5
    import tensorflow as tf
    import yaml

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from models import load_dataset
    from studies.config import load_config
    from studies.tracking import save_model

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        frame = make_table(args.rows)
        frame.to_parquet(workdir / "table.parquet")
        space = workdir / "space.yaml"
        space.write_text(yaml.safe_dump({"params": {k: {"type": "fixed", "value": v} for k, v in PARAMS.items()}}))
        config = workdir / "study.yaml"
        config.write_text(yaml.safe_dump({
            "study": {"name": "tabular", "seed": 0}, "dataset": {"path": str(workdir / "table.parquet"), "target": "target"},
            "model": {"family": "mlp", "task": "binary"}, "search_space": str(space), "objective": {"metric": "val_loss"},
            "budget": {"n_trials": 100}, "sampler": {"type": "random"}, "pruner": {"type": "none"},
            "training": {"epochs": args.epochs, "batch_size": PARAMS["batch_size"], "early_stopping_patience": None},
            "tracking": {"enabled": False}, "registry": {"auto": False}}))
        loaded = load_config(config)
        start = time.perf_counter()
        ds = loaded.config.dataset
        data = load_dataset(path=ds.path, target=ds.target, task="binary", seed=0)
        load_seconds = time.perf_counter() - start
        print(f"table: {args.rows:,} rows -> {data.spec.table.width} model inputs; loading + encoding once per study: "
              f"{load_seconds:.1f} s; TF 1 thread, OMP_NUM_THREADS=1")
        times = trial_times(loaded, data, args.epochs, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nTrial, fixed MLP 2x64, {args.epochs} epochs, batch 256, {args.rounds} round(s), alternating")
        for k in ("ours", "peer"):
            print(f"  {k:<5} {med[k]:7.2f} s  (all: {', '.join(f'{v:.2f}' for v in times[k])})")
        model_dir = save_model(_trained(data), data.spec, {"optuna.study_name": "tabular", "optuna.trial_number": "0"})
        record = json.loads(frame.drop(columns=["target"]).head(1).to_json(orient="records"))[0]
        record["num_1"], record["cat_4"] = None, "never-seen"
        h = http(model_dir, record, args.seconds, args.rounds, args.quick)
        print(f"\nHTTP, one raw record (a null, an unseen category), 8 connections, {args.rounds} round(s) x {args.seconds:g} s")
        print(f"  {'server':<6} {'req/s':>8} {'p50 ms':>8} {'server CPU s':>13} {'client CPU s':>13}")
        for n in ("ours", "noop"):
            print(f"  {n:<6} {h[n]['rps']:8.0f} {h[n]['p50']:8.2f} {h[n]['server_cpu']:13.1f} {h[n]['client_cpu']:13.1f}")
        b = batch(model_dir, frame, args.rounds)
        print(f"\nBatch in memory, {args.rows:,} raw rows, 100k-row chunks")
        print(f"  ours (encode + forward) {b['ours']:12,.0f} rows/s\n  floor (forward only)    {b['floor']:12,.0f} rows/s")
        print(f"\ntrial ours/peer = {med['ours'] / med['peer']:.2f} (goal <= 1.15); "
              f"req/s ours/noop = {h['ours']['rps'] / h['noop']['rps']:.2f} (goal >= 0.45); "
              f"p50 ours/noop = {h['ours']['p50'] / h['noop']['p50']:.2f} (goal <= 1.6); "
              f"batch ours/floor = {b['ours'] / b['floor']:.2f} (goal >= 0.5)")
    return 0


def _trained(data):
    import keras

    from models import FAMILIES
    from models.training import fit

    keras.utils.set_random_seed(0)
    model = FAMILIES["mlp"].build(PARAMS, data.spec)
    fit(model, data, epochs=1, batch_size=PARAMS["batch_size"])
    return model


if __name__ == "__main__":
    sys.exit(main())
