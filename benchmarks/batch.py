"""Batch-scoring benchmark, side by side in one run (one TensorFlow thread, OMP_NUM_THREADS=1).

The breast-cancer MLP of benchmarks/serving.py, registered as `models:/bench@champion`; N generated
rows (default 1,000,000: an integer id and 30 float features).

  Files     Parquet -> Parquet through the job (`plan` + the single-process engine: read, validate,
            score, write), excluding process start-up and the model load, vs the in-memory scoring
            path (`LoadedModel.predict_arrays` on the rows already in memory, 100k-row chunks).
            Goal: >= 0.5x.
  Postgres  table -> table with `--key id` (key scan, keyset-paged COPY reads, COPY + upsert
            writes into a new table) vs the I/O floor: `COPY (SELECT ...) TO STDOUT` of the same
            input plus `COPY ... FROM STDIN` of the same output rows into a new table with the same
            primary key. Goal: >= 0.5x.
  Dask      an 8-part Parquet folder: `--engine dask` on a local cluster of 2 worker processes vs
            the single-process engine (two parts in flight, its default). Warm (the workers hold the
            model, as a cluster joined with --scheduler does after its first job; goal >= 1.6x; this
            machine's two-process ceiling measured 1.74x for two one-core processes) and cold (the
            cluster started and the model loaded inside the timing). Also prints how many cores the
            single process keeps busy (its parts' reader, scoring and writer threads): 2 workers can
            be at most (cores of the machine / that) faster; and, for context, the single process
            with one part at a time (`--parts-at-once 1`, the engine before 2026-12-06's second stop)
            against both.
  MLflow    the whole `python -m serving.batch` process vs `mlflow models predict` (--env-manager
            local) on the same 200,000 rows (ours from CSV; MLflow from its JSON tensor format, as it
            cannot build the model's tensor input from named CSV columns), wall time including
            start-up (ratio reported).

    python benchmarks/batch.py [--quick] [--rows N] [--no-postgres] [--no-mlflow]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_serving", Path(__file__).with_name("serving.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # its model, registry and THREADS settings (applied on import)
# numpy after them: OpenBLAS reads OMP_NUM_THREADS once, when numpy loads (imported first, this
# process's in-memory scoring ran on two BLAS threads while the docstring promised one).
import numpy as np  # noqa: E402

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
POSTGRES = os.environ.get("WORKBENCH_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/optuna")


def make_rows(data, rows: int):
    import pandas as pd

    rng = np.random.default_rng(0)
    x = (data.x_train[rng.integers(0, len(data.x_train), rows)] * rng.normal(1, 0.05, (rows, data.x_train.shape[1])))
    frame = pd.DataFrame(x.astype(np.float32), columns=list(data.spec.feature_names))
    frame.insert(0, "id", np.arange(rows, dtype=np.int64))
    return frame


def run_job(store, **spec) -> float:
    """Seconds of plan + the single-process engine (the model is already loaded in this process)."""
    from serving.batch.job import JobSpec, plan, run_local

    t = time.perf_counter()
    run_local(plan(JobSpec(model_uri="models:/bench@champion", **spec), store, stamp=uuid.uuid4().hex[:8]), progress=False)
    return time.perf_counter() - t


def bench_files(store, model, frame, workdir: Path, rounds: int) -> dict[str, list[float]]:
    source = workdir / "rows.parquet"
    frame.to_parquet(source, index=False)
    x = frame[model.feature_names].to_numpy(dtype=np.float32)
    chunk = 100_000
    out: dict[str, list[float]] = {"job": [], "memory": []}
    run_job(store, input=str(source), output=str(workdir / "warmup.parquet"))  # first-use imports: start-up, not timed
    gc.freeze()  # as `python -m serving.batch` does once the model is loaded (else a full collection lands in a round)
    for r in range(rounds):
        out["job"].append(len(frame) / run_job(store, input=str(source), output=str(workdir / f"out{r}.parquet")))
        t = time.perf_counter()
        for i in range(0, len(x), chunk):
            model.predict_arrays(x[i:i + chunk])
        out["memory"].append(len(frame) / (time.perf_counter() - t))
    return out


def bench_postgres(store, model, frame, rounds: int) -> dict[str, list[float]]:
    import pandas as pd
    import sqlalchemy

    engine = sqlalchemy.create_engine(POSTGRES)
    source = f"bench_rows_{uuid.uuid4().hex[:6]}"
    frame.head(0).to_sql(source, engine, index=False)
    copy_in(engine, source, frame)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {source} ADD PRIMARY KEY (id)")
    predicted = None
    out: dict[str, list[float]] = {"job": [], "copy": []}
    try:
        for _ in range(rounds):
            target = f"bench_pred_{uuid.uuid4().hex[:6]}"
            out["job"].append(len(frame) / run_job(store, input=POSTGRES, input_table=source, output=POSTGRES,
                                                   output_table=target, key="id"))
            if predicted is None:  # the floor writes the same output rows
                predicted = pd.read_sql(f"SELECT * FROM {target}", engine)
            drop(engine, target)
            floor = f"bench_copy_{uuid.uuid4().hex[:6]}"
            predicted.head(0).to_sql(floor, engine, index=False)
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {floor} ADD PRIMARY KEY (id)")
            t = time.perf_counter()
            raw = engine.raw_connection()
            with raw.cursor() as cur:
                buffer = io.BytesIO()
                cur.copy_expert(f"COPY (SELECT * FROM {source}) TO STDOUT WITH (FORMAT csv, HEADER true)", buffer)
            raw.commit()
            raw.close()
            copy_in(engine, floor, predicted)
            out["copy"].append(len(frame) / (time.perf_counter() - t))
            drop(engine, floor)
    finally:
        drop(engine, source)
        engine.dispose()
    return out


def copy_in(engine, table: str, frame) -> None:
    raw = engine.raw_connection()
    with raw.cursor() as cur:
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False, header=False)
        buffer.seek(0)
        cur.copy_expert(f"COPY {table} FROM STDIN WITH (FORMAT csv)", buffer)
    raw.commit()
    raw.close()


def drop(engine, table: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


def bench_dask(store, frame, workdir: Path, rounds: int) -> dict[str, list[float]]:
    from serving.batch.cluster import connect, run_dask
    from serving.batch.job import JobSpec, plan

    folder = workdir / "parts"
    folder.mkdir()
    size = -(-len(frame) // 8)
    for i in range(8):
        frame.iloc[i * size:(i + 1) * size].to_parquet(folder / f"part-{i}.parquet", index=False)

    def job(output: str, scheduler: str | None, at_once: int = 2) -> float:
        t, cpu = time.perf_counter(), time.process_time()
        p = plan(JobSpec(input=str(folder), output=output, model_uri="models:/bench@champion", parts_at_once=at_once), store,
                 stamp="x", distributed=scheduler is not None)
        if scheduler is None:
            from serving.batch.job import run_local

            run_local(p, progress=False)
        else:
            run_dask(p, scheduler=scheduler, workers=2)
        seconds = time.perf_counter() - t
        if scheduler is None and at_once == 2:  # how many cores the single process keeps busy (its threads)
            out["single cores"].append((time.process_time() - cpu) / seconds)
        return seconds

    out: dict[str, list[float]] = {"single": [], "single x1": [], "dask": [], "dask cold": [], "single cores": []}
    with connect(None, 2) as client:  # the local cluster `--engine dask --workers 2` starts
        scheduler = client.scheduler.address
        t = time.perf_counter()
        job(str(workdir / "warmup"), scheduler)  # the workers load the model
        out["dask cold"].append(len(frame) / (time.perf_counter() - t))
        for r in range(rounds):
            out["single"].append(len(frame) / job(str(workdir / f"single{r}"), None))
            out["dask"].append(len(frame) / job(str(workdir / f"dask{r}"), scheduler))
            out["single x1"].append(len(frame) / job(str(workdir / f"one{r}"), None, at_once=1))
    return out


def bench_mlflow(frame, model_dir: Path, workdir: Path, tracking: str) -> dict[str, float]:
    """Whole processes on the same rows: ours reads them as CSV; `mlflow models predict` cannot
    (the model's signature is one tensor, which MLflow does not build from named CSV columns), so it
    gets them as JSON `{"inputs": [[...], ...]}`, the format it documents for tensor models."""
    import json

    features = frame.drop(columns=["id"])
    csv, body = workdir / "rows.csv", workdir / "rows.json"
    features.to_csv(csv, index=False)
    body.write_text(json.dumps({"inputs": features.to_numpy().tolist()}))
    env = {**os.environ, **bench.THREADS, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    commands = {
        "ours": [sys.executable, "-m", "serving.batch", "--input", str(csv), "--output", str(workdir / "ours.csv"),
                 "--model", "models:/bench@champion", "--no-tracking"],
        "mlflow": [str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m", str(model_dir), "-i", str(body),
                   "-t", "json", "-o", str(workdir / "mlflow.json"), "--env-manager", "local"],
    }
    seconds = {}
    for name, argv in commands.items():
        t = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        seconds[name] = time.perf_counter() - t
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20k rows, 1 round, no MLflow peer")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--mlflow-rows", type=int, default=200_000, help="rows for the `mlflow models predict` comparison")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds, args.no_mlflow = 20_000, 1, True
    from serving.batch.job import pin
    from serving.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        _, data, model_dir = bench.train_model(workdir)
        tracking = bench.make_registry(workdir, [model_dir])
        os.environ["MLFLOW_TRACKING_URI"] = tracking  # the Dask workers load the model from it too
        store = Store(tracking)
        _, model = pin("models:/bench@champion", store)
        frame = make_rows(data, args.rows)
        lines, goals = [], []

        def report(name: str, ours: list[float], peer: list[float], goal: float | None, what: str) -> None:
            ratios = [o / p for o, p in zip(ours, peer, strict=True)]
            lines.append(f"{name:<9} {statistics.median(ours):>12,.0f} rows/s vs {what} {statistics.median(peer):>12,.0f}: "
                         f"{statistics.median(ratios):.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)})"
                         + (f"  goal >= {goal}x" if goal else ""))
            print(lines[-1], flush=True)
            if goal:
                goals.append((name, statistics.median(ratios) >= goal))

        files = bench_files(store, model, frame, workdir, args.rounds)
        report("files", files["job"], files["memory"], 0.5, "in memory")
        if not args.no_postgres:
            pg = bench_postgres(store, model, frame, args.rounds)
            report("postgres", pg["job"], pg["copy"], 0.5, "COPY only")
        if not args.no_dask:
            dk = bench_dask(store, frame, workdir, args.rounds)
            report("dask", dk["dask"], dk["single"], 1.6, "one process")
            report("dask cold", dk["dask cold"], dk["single"][:1], None, "one process")
            report("parts x2", dk["single"], dk["single x1"], None, "one at a time")
            report("dask/x1", dk["dask"], dk["single x1"], None, "one process, one part at a time")
            cores = statistics.median(dk["single cores"])
            lines.append(f"dask      the single process kept {cores:.2f} of this machine's {os.cpu_count()} cores busy "
                         f"(rounds {', '.join(f'{c:.2f}' for c in dk['single cores'])}): 2 worker processes can be at "
                         f"most {(os.cpu_count() or 1) / cores:.2f}x faster here")
            print(lines[-1], flush=True)
        if not args.no_mlflow:
            n = min(args.rows, args.mlflow_rows)
            seconds = bench_mlflow(frame.head(n), model_dir, workdir, tracking)
            lines.append(f"mlflow    {n:,} rows, whole process incl. start-up: ours {seconds['ours']:.1f} s vs `mlflow models "
                         f"predict` {seconds['mlflow']:.1f} s: {seconds['mlflow'] / seconds['ours']:.2f}x faster")
        print(f"\n{args.rows:,} rows, {args.rounds} round(s), OMP_NUM_THREADS=1, one TensorFlow thread per process")
        print("\n".join(lines))
        met = [name for name, ok in goals if ok]
        print(f"goals met: {len(met)} of {len(goals)} ({', '.join(met) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
