"""Batch scoring on files, folders and SQLite (the shipped churn table and the tiny churn model):
incremental runs score each row exactly once, a stopped job leaves nothing half-written, bad input
is one line and exit code 2, and the Dask engine writes what the single process writes."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import sqlalchemy

import models.numpy_net
from serving.batch import job
from serving.batch.__main__ import main as batch_main
from serving.model import load
from serving.settings import ServingSettings
from serving.store import Store
from tests.conftest import CHURN

MODEL = "models:/churn_tiny@champion"


@pytest.fixture
def home(churn_study, monkeypatch):
    config, code = churn_study
    assert code == 0
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(config.parent / "home"))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def rows() -> pd.DataFrame:
    return pd.read_csv(CHURN).drop(columns=["churn"])


def split(frame: pd.DataFrame, folder, n: int, fmt: str = "parquet") -> None:
    folder.mkdir(exist_ok=True)
    size = -(-len(frame) // n)
    for i in range(n):
        part = frame.iloc[i * size:(i + 1) * size]
        getattr(part, f"to_{fmt}")(folder / f"day-{i}.{fmt}", index=False)


def read_folder(folder) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], ignore_index=True)


def run(*args: str) -> int:
    return batch_main([*args, "--model", MODEL, "--no-tracking"])


def test_a_folder_is_scored_incrementally_each_row_exactly_once(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models.numpy_net, "BLOCK_BYTES", 1)  # 256-row blocks: each 500-row part takes two
    monkeypatch.setattr(job, "_MODELS", type(job._MODELS)())  # loaded anew, with them (not another test's copy)
    data = rows()
    split(data.head(1500), tmp_path / "in", 3)
    out = tmp_path / "out"
    assert run("--input", str(tmp_path / "in"), "--output", str(out), "--key", "customer_id") == 0
    first = read_folder(out)
    assert len(first) == 1500 and first["customer_id"].is_unique
    assert set(first["model_name"].astype(str)) == {"churn_tiny"} and set(first["model_version"].astype(str)) == {"1"}
    assert str(first["scored_at"].dtype).startswith("datetime64") and "row" not in first
    assert len(list(out.glob("*.parquet"))) == 3  # one part per input part
    # the job lays a chunk's encoded columns out a block at a time (models.tabular.EncodedRows):
    # the same probabilities as the model on the whole chunk's matrix
    model = load(MODEL, Store.at(ServingSettings()))
    assert model.forward._block == 256
    _, probs = model.predict_arrays(model.table.encode(data.head(1500)))
    scored = first.set_index("customer_id").loc[data.head(1500)["customer_id"]]
    np.testing.assert_allclose(scored["probability_yes"].to_numpy(), probs[:, 1], rtol=1e-6)

    assert run("--input", str(tmp_path / "in"), "--output", str(out), "--key", "customer_id") == 0
    assert "scored 0 of 0 rows, 1500 already scored" in capsys.readouterr().out
    data.iloc[1500:].to_parquet(tmp_path / "in" / "day-3.parquet", index=False)  # a new day arrives
    assert run("--input", str(tmp_path / "in"), "--output", str(out), "--key", "customer_id") == 0
    assert "scored 500 of 500 rows, 1500 already scored" in capsys.readouterr().out
    every = read_folder(out)
    assert len(every) == 2000 and every["customer_id"].is_unique

    assert run("--input", str(tmp_path / "in"), "--output", str(out), "--key", "customer_id", "--rescore") == 0
    assert len(read_folder(out)) == 4000  # every row once more, in new parts


@pytest.mark.parametrize("at_once", [1, 2])
def test_a_stopped_job_keeps_only_whole_parts_and_a_rerun_finishes_it(home, tmp_path, at_once):
    from serving.batch.job import JobSpec, Stopped, plan, run_local, run_part
    from serving.settings import ServingSettings
    from serving.store import Store

    split(rows(), tmp_path / "in", 4)
    out = tmp_path / "out"
    spec = JobSpec(input=str(tmp_path / "in"), output=str(out), model_uri=MODEL, key="customer_id", chunk_rows=200,
                   parts_at_once=at_once)
    p = plan(spec, Store.at(ServingSettings()), stamp="t1")
    stop = threading.Event()
    real = run_part
    started, finished, overlapped = [], [], []
    second = threading.Event()

    def stop_in_second(task, part, model, stop_event):
        started.append(part.index)
        if part.index == 0 and at_once > 1:
            second.wait(10)  # one at a time, the second part cannot start meanwhile
        if part.index == 1:
            overlapped.append(0 not in finished)
            stop_event.set()  # SIGTERM arrives while the second part is being scored
            second.set()
        try:
            return real(task, part, model, stop_event)
        finally:
            finished.append(part.index)

    import serving.batch.job as job

    job.run_part, saved = stop_in_second, job.run_part
    try:
        with pytest.raises(Stopped):
            run_local(p, stop, progress=False)
    finally:
        job.run_part = saved
    assert sorted(started) == [0, 1]  # no part starts after the signal
    assert overlapped == [at_once > 1]  # with two at once, the second part starts beside the first
    kept = sorted(f.name for f in out.iterdir())  # whole parts only, no temporary file
    # With two at once, the first part, in flight beside the second, stops at its first chunk too.
    assert kept == (["day-0-t1.parquet"] if at_once == 1 else [])
    p2 = plan(spec, Store.at(ServingSettings()), stamp="t2")
    assert p2.skipped == 500 * len(kept) and len(p2.parts) == 4 - len(kept)
    run_local(p2, progress=False)
    scored = read_folder(out)
    assert len(scored) == 2000 and scored["customer_id"].is_unique


def test_a_sqlite_table_is_upserted_and_changed_rows_are_scored_again(home, tmp_path, capsys):
    import signal

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    engine = sqlalchemy.create_engine(url)
    data = rows().head(300).assign(updated_at=pd.Timestamp("2026-12-01", tz="UTC"))
    data.loc[4, "tenure_months"] = -1e400  # -inf: cannot be scored
    data.to_sql("customers", engine, index=False)
    args = ["--input", url, "--input-table", "customers", "--output", url, "--output-table", "scores",
            "--key", "customer_id", "--since-column", "updated_at", "--chunk-rows", "64"]
    assert run(*args) == 3
    scores = pd.read_sql("SELECT * FROM scores", engine)
    assert len(scores) == 299 and scores["customer_id"].is_unique
    errors = pd.read_sql("SELECT * FROM scores_errors", engine)
    assert errors["customer_id"].tolist() == ["C-000005"] and "tenure_months" in errors.loc[0, "reason"]
    columns = {c["name"]: str(c["type"]) for c in sqlalchemy.inspect(engine).get_columns("scores")}
    assert columns["probability_yes"] == "DOUBLE" and columns["customer_id"] == "TEXT"

    with engine.begin() as conn:  # two customers change; one new customer arrives
        conn.exec_driver_sql("UPDATE customers SET tenure_months = 70, updated_at = '2026-12-02 00:00:00.000000' "
                             "WHERE customer_id IN ('C-000010', 'C-000020')")
    rows().iloc[[300]].assign(updated_at=pd.Timestamp("2026-12-02", tz="UTC")).to_sql("customers", engine, index=False,
                                                                                       if_exists="append")
    capsys.readouterr()
    assert run(*args) == 3  # the -inf row is still invalid
    assert "scored 3 of 4 rows, 297 already scored" in capsys.readouterr().out
    again = pd.read_sql("SELECT * FROM scores", engine)
    assert len(again) == 300 and again["customer_id"].is_unique
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # the command put them back
    changed = again.set_index("customer_id").loc[["C-000010", "C-000020"], "scored_at"]
    assert (pd.to_datetime(changed) > pd.to_datetime(scores["scored_at"]).max()).all()


@pytest.mark.parametrize(("setup", "args", "message"), [
    (lambda t: None, ["--input", "{t}/none", "--output", "{t}/o"], "--input: must be a .csv or .parquet file, a folder"),
    (lambda t: (t / "empty").mkdir(), ["--input", "{t}/empty", "--output", "{t}/o"], "--input: no .csv or .parquet files in"),
    (lambda t: (rows().head(5).to_parquet(t / "a.parquet"), rows().head(5).drop(columns=["region"]).to_parquet(t / "b.parquet")),
     ["--input", "{t}", "--output", "{t}/o"], "--input: the parts have different columns: b.parquet differs from a.parquet in region"),
    (lambda t: pd.concat([rows().head(3), rows().head(1)]).to_csv(t / "d.csv", index=False),
     ["--input", "{t}/d.csv", "--output", "{t}/o", "--key", "customer_id"], "--key customer_id: not unique in the input: "
     "1 value(s) appear more than once, e.g. 'C-000001'"),
    (lambda t: rows().head(3).to_csv(t / "d.csv", index=False),
     ["--input", "{t}/d.csv", "--output", "{t}/o.csv", "--key", "customer_id"], "--key: incremental scoring needs --output to be"),
    (lambda t: rows().head(3).drop(columns=["contract"]).to_csv(t / "d.csv", index=False),
     ["--input", "{t}/d.csv", "--output", "{t}/o"], "--input: the input lacks column(s) contract"),
    (lambda t: None, ["--input", "sqlite:///{t}/x.db", "--input-table", "nope", "--output", "{t}/o"], "--input-table: no table 'nope'"),
    (lambda t: rows().head(3).to_sql("c", sqlalchemy.create_engine(f"sqlite:///{t}/x.db"), index=False),
     ["--input", "sqlite:///{t}/x.db", "--input-query", "SELECT customer_id FROM missing_table", "--output", "{t}/o"],
     "--input-query: OperationalError: no such table: missing_table"),
    (lambda t: rows().head(3).to_csv(t / "d.csv", index=False), ["--input", "{t}", "--output", "{t}/o", "--engine", "dask",
     "--workers", "0"], "--workers: must be >= 1, got 0"),
    (lambda t: rows().head(3).to_csv(t / "d.csv", index=False), ["--input", "{t}/d.csv", "--output", "{t}/o", "--parts-at-once", "0"],
     "--parts-at-once: must be >= 1, got 0"),
    (lambda t: rows().head(3).to_csv(t / "d.csv", index=False), ["--input", "{t}/d.csv", "--output", "{t}/o", "--every", "soon"],
     "--every: a positive duration like 30s, 5m, 1h or 1d, got 'soon'"),
])
def test_bad_input_is_one_line_and_exit_code_2(home, tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    assert run(*(a.format(t=tmp_path) for a in args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {message}"), err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_dask_engine_writes_what_the_single_process_writes(home, tmp_path, capsys):
    """Dask, and the single process with one part or three parts in flight: the same rows and errors."""
    data = rows()
    data["senior"] = data["senior"].astype(object)
    data.loc[[5, 1207], "senior"] = "maybe"  # invalid rows in two parts
    split(data, tmp_path / "in", 4, fmt="csv")
    runs = {"one": ("local", "1"), "three": ("local", "3"), "many": ("dask", "1")}
    for out, (engine, at_once) in runs.items():
        code = run("--input", str(tmp_path / "in"), "--output", str(tmp_path / out), "--engine", engine, "--workers", "2",
                   "--parts-at-once", at_once, "--chunk-rows", "128", "--errors", str(tmp_path / f"{out}-errors.csv"))
        assert code == 3, capsys.readouterr().err
    one, *others = (pd.concat([pd.read_csv(p) for p in sorted((tmp_path / o).glob("*.csv"))], ignore_index=True)
                    for o in runs)
    assert len(one) == 1998 and list(one.columns[:3]) == ["part", "row", "customer_id"]
    for other in others:
        pd.testing.assert_frame_equal(one.drop(columns="scored_at"), other.drop(columns="scored_at"))
    errors = [pd.read_csv(tmp_path / f"{o}-errors.csv").drop(columns="scored_at") for o in runs]
    for other in errors[1:]:
        pd.testing.assert_frame_equal(errors[0], other)
    assert errors[0][["part", "row"]].values.tolist() == [["day-0.csv", 5], ["day-2.csv", 207]]


def test_local_dask_workers_keep_glibc_malloc_defaults():
    """Dask's MALLOC_TRIM_THRESHOLD_ made every large array a fresh mmap (parts 1.45x slower):
    serving/batch/dask.yaml unsets it for the local cluster's workers."""
    import os

    from serving.batch.cluster import connect

    with connect(None, 1) as client:
        (env,) = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OPENBLAS_NUM_THREADS")}).values()
    assert env == {"MALLOC_TRIM_THRESHOLD_": None, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}


def test_a_worker_leaves_its_model_and_libraries_out_of_full_collections(monkeypatch):
    """A full collection of a heap with TensorFlow on it paused a Dask worker ~0.2 s inside a part
    (about one job in three of benchmarks/batch.py's rounds): a worker freezes its heap once it
    has loaded the model."""
    import gc

    import serving.model
    import serving.store
    from serving.batch import job

    monkeypatch.setattr(serving.store, "Store", lambda tracking, registry: None)
    monkeypatch.setattr(serving.model, "load", lambda uri, store: object())
    monkeypatch.setattr(job, "_MODELS", type(job._MODELS)())
    pinned = job.PinnedModel("models:/m/1", "sqlite:///unused.db", "sqlite:///unused.db")
    gc.unfreeze()
    try:
        model = job.worker_model(pinned)
        assert gc.get_freeze_count() > 0
        assert job.worker_model(pinned) is model
    finally:
        gc.unfreeze()
    # A schedule whose alias moves loads each new version; the worker keeps the last few, not all.
    for version in range(2, 9):
        job.worker_model(job.PinnedModel(f"models:/m/{version}", pinned.tracking_uri, pinned.registry_uri))
    job.worker_model(job.PinnedModel("models:/m/7", pinned.tracking_uri, pinned.registry_uri))
    assert [key[0] for key in job._MODELS] == [f"models:/m/{v}" for v in range(9 - job.MODELS_KEPT, 9) if v != 7] + ["models:/m/7"]


def test_every_repeats_until_sigterm_then_exits_0(home, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    rows().head(200).to_csv(tmp_path / "in.csv", index=False)
    url = f"sqlite:///{tmp_path / 'out.db'}"
    job = subprocess.Popen([sys.executable, "-m", "serving.batch", "--input", str(tmp_path / "in.csv"), "--output", url,
                            "--output-table", "scores", "--key", "customer_id", "--every", "1s", "--model", MODEL, "--no-tracking"],
                           cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    lines = [job.stdout.readline() for _ in range(2)]  # two runs: the second finds everything done
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 0, job.stderr.read()[-2000:]
    assert lines[0].startswith("scored 200 of 200 rows") and lines[1].startswith("scored 0 of 0 rows, 200 already scored"), lines


def test_every_on_a_local_dask_cluster_keeps_its_workers_between_runs(home, tmp_path, monkeypatch, capsys):
    """`--every --engine dask` starts its local cluster once: the second run's parts go to the same
    worker processes (which hold the model), not to a new cluster."""
    import os
    import sys

    from distributed import Client

    import serving.batch.__main__ as command

    data = rows()
    split(data.head(400), tmp_path / "in", 2)
    real, workers, mlflow_loaded = command.run_once, [], []

    def run_once(args, store, stop):
        try:
            code = real(args, store, stop)
            with Client(args.scheduler) as client:
                workers.append(sorted(client.run(os.getpid).values()))
                mlflow_loaded.extend(client.run(lambda: "mlflow" in sys.modules).values())
            if len(workers) == 1:
                data.iloc[400:500].to_parquet(tmp_path / "in" / "day-9.parquet", index=False)  # a new part arrives
                return code
        except BaseException:
            stop.set()
            raise
        stop.set()  # as SIGTERM would
        return code

    monkeypatch.setattr(command, "run_once", run_once)
    assert run("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--key", "customer_id",
               "--engine", "dask", "--workers", "1", "--every", "1s") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("scored 400 of 400 rows") and lines[1].startswith("scored 100 of 100 rows, 400 already"), lines
    assert len(workers) == 2 and workers[0] == workers[1] and len(workers[0]) == 1
    assert mlflow_loaded == [False, False]  # a local worker loads the model from the job's own files, without MLflow
    assert lines[0].split(" on the Dask cluster at ")[1].split()[0] == lines[1].split(" on the Dask cluster at ")[1].split()[0]


def test_the_reader_and_writer_threads_keep_order_and_hand_errors_over():
    from serving.batch.overlap import WriteBehind, ahead

    assert list(ahead(iter(range(50)), depth=2)) == list(range(50))

    def dropped():
        yield 1
        raise ConnectionError("server closed the connection")  # a transient error stays one

    rows_ = ahead(dropped())
    assert next(rows_) == 1
    with pytest.raises(ConnectionError):
        next(rows_)
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    early = ahead(endless(), depth=1)
    assert next(early) == 0
    early.close()  # stops the thread and closes the source (a file, a cursor) there
    assert closed == [True]

    class Sink:
        def __init__(self):
            self.frames = []

        def write(self, frame):
            if frame == "bad":
                raise OSError("disk full")
            self.frames.append(frame)

    sink = Sink()
    writer = WriteBehind(sink)
    for frame in ("a", "b", "c"):
        writer.write(frame)
    writer.close()
    assert sink.frames == ["a", "b", "c"]
    failing = WriteBehind(Sink())
    failing.write("bad")
    with pytest.raises(OSError, match="disk full"):
        failing.close()


@pytest.mark.parametrize("row_group", [7_000, 100_000])
def test_a_parquet_file_is_read_once_in_order_with_a_small_first_chunk(tmp_path, row_group):
    """The first chunk is read small (the scoring thread waits for it alone) and the later reader
    skips its rows: every row once, in order, whatever the file's row groups."""
    import numpy as np

    from serving.batch.sources import FIRST_CHUNK_ROWS, file_chunks

    frame = pd.DataFrame({"id": np.arange(61_234), "x": np.arange(61_234) * 0.5, "unused": 1})
    frame.to_parquet(tmp_path / "in.parquet", index=False, row_group_size=row_group)
    chunks = list(file_chunks(tmp_path / "in.parquet", "parquet", ["id", "x"], 25_000))
    assert len(chunks[0]) <= FIRST_CHUNK_ROWS and all(len(c) <= 25_000 for c in chunks)
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), frame[["id", "x"]])
