"""Batch scoring against the real services: PostgreSQL tables (a job killed with SIGKILL, then the
server restarted under the rerun), moto's S3 prefixes, and a real Dask cluster losing a worker.
Each row ends up scored exactly once."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy

from tests.conftest import CHURN, ROOT, free_port

BIN = Path(sys.executable).parent


@pytest.fixture
def env(churn_study):
    """The environment of a batch process: the tiny churn model's embedded store, the stack's S3."""
    config, code = churn_study
    assert code == 0
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out.update(WORKBENCH_HOME=str(config.parent / "home"), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", TF_CPP_MIN_LOG_LEVEL="3")
    return out


def customers(n: int) -> pd.DataFrame:
    """n rows of the churn table (repeated) with a unique integer id."""
    base = pd.read_csv(CHURN).drop(columns=["churn", "customer_id"])
    frame = pd.concat([base] * -(-n // len(base)), ignore_index=True).head(n)
    frame.insert(0, "id", range(n))
    return frame


def batch(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving.batch", *args, "--model", "models:/churn_tiny@champion",
                             "--no-tracking"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except sqlalchemy.exc.OperationalError:
            pass  # the server is restarting
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[-1]


@pytest.mark.exclusive  # restarts PostgreSQL
def test_a_killed_postgres_job_and_a_restart_under_its_rerun_score_each_row_once(postgres_url, env):
    engine = sqlalchemy.create_engine(postgres_url)
    source, target = f"rows_{uuid.uuid4().hex[:8]}", f"pred_{uuid.uuid4().hex[:8]}"
    data = customers(40_000)
    pd.DataFrame(columns=data.columns).astype(data.dtypes.to_dict()).to_sql(source, engine, index=False)
    raw = engine.raw_connection()
    with raw.cursor() as cur:  # COPY: 40k rows in well under a second
        buffer = io.StringIO()
        data.to_csv(buffer, index=False, header=False)
        buffer.seek(0)
        cur.copy_expert(f"COPY {source} FROM STDIN WITH (FORMAT csv)", buffer)
    raw.commit()
    raw.close()

    def scored() -> int:
        with engine.connect() as conn:
            if not sqlalchemy.inspect(conn).has_table(target):
                return 0
            return conn.exec_driver_sql(f"SELECT count(*) FROM {target}").scalar()

    args = ["--input", postgres_url, "--input-table", source, "--output", postgres_url, "--output-table", target,
            "--key", "id", "--chunk-rows", "400"]
    try:
        first = batch(env, *args)
        wait_until(lambda: scored() > 0, 120, "the first committed chunk")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        before = scored()
        assert 0 < before < 40_000, before  # killed mid-job

        second = batch(env, *args)
        wait_until(lambda: scored() > before or second.poll() is not None, 120, "the rerun's first chunk")
        assert second.poll() is None, second.communicate()[1][-3000:]  # still running: the restart comes mid-job
        restart = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "restart"],
                                 capture_output=True, text=True, timeout=120)
        assert restart.returncode == 0, restart.stderr
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
        assert f"scored {40_000 - before} of " in out and f"{before} already scored by this version" in out, out
        engine.dispose()  # the restart closed the pooled connections
        with engine.connect() as conn:
            count, distinct = conn.exec_driver_sql(f"SELECT count(*), count(DISTINCT id) FROM {target}").one()
        assert count == distinct == 40_000
        retried = [line for line in err.splitlines() if "attempt" in line]
        assert not retried or all("batch part" in line for line in retried)
    finally:
        engine.dispose()
        with sqlalchemy.create_engine(postgres_url).begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {source}, {target}, {target}_errors")


def in_process(env: dict, monkeypatch, *args: str) -> int:
    """The command in this process (its model and TensorFlow already loaded: no start-up)."""
    from serving.batch.__main__ import main as batch_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", env["WORKBENCH_HOME"])
    return batch_main([*args, "--model", "models:/churn_tiny@champion", "--no-tracking"])


def test_s3_prefixes_in_and_out_incrementally(s3_bucket, env, monkeypatch, capsys):
    client, bucket = s3_bucket
    prefix = f"batch-{uuid.uuid4().hex[:8]}"
    data = customers(3_000)
    data["tenure_months"] = data["tenure_months"].astype(float)
    data.loc[10, "tenure_months"] = float("inf")  # cannot be scored
    for i in range(3):
        buffer = io.BytesIO()
        data.iloc[i * 1000:(i + 1) * 1000].to_parquet(buffer, index=False)
        client.put_object(Bucket=bucket, Key=f"{prefix}/in/day-{i}.parquet", Body=buffer.getvalue())
    args = ["--input", f"s3://{bucket}/{prefix}/in/", "--output", f"s3://{bucket}/{prefix}/out/", "--key", "id"]
    assert in_process(env, monkeypatch, *args) == 3  # one invalid row
    assert "scored 2999 of 3000 rows" in capsys.readouterr().out
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/out/")["Contents"])
    parts = [k for k in keys if k.rsplit("/", 1)[1].startswith("day-")]
    assert len(parts) == 3 and len(keys) == 4 and "/_errors-" in keys[0]
    frames = [pd.read_parquet(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read())) for k in parts]
    assert pd.concat(frames)["id"].sort_values().tolist() == [i for i in range(3000) if i != 10]

    assert in_process(env, monkeypatch, *args) == 3
    assert "scored 0 of 1 rows, 2999 already scored" in capsys.readouterr().out

    empty = in_process(env, monkeypatch, "--input", f"s3://{bucket}/{prefix}/nothing/", "--output", f"s3://{bucket}/{prefix}/o/")
    assert empty == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: --input: no .csv or .parquet files in 's3://{bucket}/{prefix}/nothing/'"



def test_a_dask_worker_killed_mid_job(env, tmp_path, monkeypatch, capsys):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask.log"
    with open(logs, "w") as log:
        scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                     env=env, stdout=log, stderr=subprocess.STDOUT)
        workers = [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT) for _ in range(2)]
    try:
        data = customers(240_000)
        (tmp_path / "in").mkdir()
        for i in range(24):
            data.iloc[i * 10_000:(i + 1) * 10_000].to_parquet(tmp_path / "in" / f"part-{i:02d}.parquet", index=False)
        out = tmp_path / "out"
        job = batch(env, "--input", str(tmp_path / "in"), "--output", str(out), "--key", "id", "--engine", "dask",
                    "--scheduler", address)
        wait_until(lambda: out.is_dir() and any(p.suffix == ".parquet" for p in out.iterdir()), 240, "the first part")
        workers[0].send_signal(signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=600)
        written = sorted(out.glob("*.parquet"))
        assert len(written) < 24 or job.returncode == 0
        from serving.batch.objects import Folder

        assert [p.name for p in written] == Folder.parse(str(out)).names()  # no half-written part is listed as data
        ids = pd.concat([pd.read_parquet(p, columns=["id"]) for p in written])["id"]
        assert ids.is_unique  # never a row twice
        assert job.returncode == 0, stderr[-3000:] + logs.read_text()[-3000:]
        assert len(written) == 24 and len(ids) == 240_000 and "scored 240000 of 240000 rows" in stdout

        # SIGTERM (the stop event): the parts not started are cancelled; what was written is whole.
        from serving.batch.cluster import run_dask
        from serving.batch.job import JobSpec, Stopped, plan
        from serving.settings import ServingSettings
        from serving.store import Store

        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setenv("WORKBENCH_HOME", env["WORKBENCH_HOME"])
        stopped = tmp_path / "stopped"
        p = plan(JobSpec(input=str(tmp_path / "in"), output=str(stopped), model_uri="models:/churn_tiny@champion", key="id"),
                 Store.at(ServingSettings()), stamp="s", distributed=True)
        stop = threading.Event()
        stop.set()
        with pytest.raises(Stopped):
            run_dask(p, scheduler=address, workers=2, stop=stop)
        time.sleep(3)  # parts already running on a worker may still land, whole
        kept = Folder.parse(str(stopped)).names()
        assert 1 <= len(kept) < 24
        assert pd.concat([pd.read_parquet(stopped / n, columns=["id"]) for n in kept])["id"].is_unique

        code = in_process(env, monkeypatch, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o2"),
                          "--engine", "dask", "--scheduler", "tcp://127.0.0.1:1")
        assert code == 1
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
            "error: --scheduler: cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    finally:
        for p in [*workers, scheduler]:
            p.kill()
            p.wait(timeout=30)
