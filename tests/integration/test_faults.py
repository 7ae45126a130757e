"""Distributed studies and the faults they survive, on the real PostgreSQL, MLflow server and S3.

Each test runs `python -m studies.run ... --workers 2` as a user would, then breaks something
for real: SIGKILL to a worker, a PostgreSQL restart, SIGTERM to the runner, connections cut
between a worker and the database.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from studies.storage.study import derive_seed
from tests.conftest import tiny_config
from tests.integration.test_postgres_runner import finish, run_cli
from tests.integration.test_tracking_server import runs_of, stack_env

FINISHED = ("COMPLETE", "PRUNED")


def slow_config(space: Path, n_trials: int, epochs: int = 8, **sections) -> dict:
    """Trials of ~1 s (8 epochs): long enough to be caught mid-trial."""
    return tiny_config(space, budget={"n_trials": n_trials}, training={"epochs": epochs, "batch_size": 32,
                                                                         "early_stopping_patience": None},
                       tracking={"log_models": "none"}, registry={"auto": False}, **sections)


def wait_for(predicate, timeout: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def trials(url: str, name: str):
    storage = optuna.storages.RDBStorage(url)  # its pool is closed at once: polling must not pile up connections
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []
    finally:
        storage.engine.dispose()


def finished(ts) -> list:
    return [t for t in ts if t.state.name in FINISHED]


def assert_clean_end(url: str, name: str, mlflow_uri: str, target: int, workers: int = 2) -> list:
    """Budget met (overshoot < workers), nothing left RUNNING in Optuna or MLflow, one run per trial."""
    ts = trials(url, name)
    assert target <= len(finished(ts)) <= target + workers - 1
    assert not [t.number for t in ts if t.state.name in ("RUNNING", "WAITING")]
    parents, children = runs_of(MlflowClient(mlflow_uri), name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert not [r.info.run_id for r in children if r.info.status == "RUNNING"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    run_ids = [t.user_attrs.get("mlflow_run_id") for t in ts]
    assert len(run_ids) == len(set(run_ids)), "a trial was recorded twice"
    return ts


def test_workers_share_the_budget_the_parent_run_and_seeds(postgres_url, mlflow_uri, study_name, write_config, tiny_space):
    path = write_config(slow_config(tiny_space, 6))
    code, out, err = finish(run_cli(str(path), "--storage", postgres_url, "--study-name", study_name, "--workers", "2",
                                    env=stack_env(mlflow_uri)))
    assert code == 0, err
    ts = assert_clean_end(postgres_url, study_name, mlflow_uri, 6)
    assert len({t.user_attrs["worker"] for t in ts}) == 2  # both workers ran trials
    for t in ts:  # replayable alone: the seed is a function of study seed and trial number
        assert t.user_attrs["seed"] == derive_seed(1, t.number)
    assert "[w0] trial" in out and "[w1] trial" in out and "COMPLETE" in out


def test_a_worker_killed_mid_trial_is_retried_and_its_run_closed(postgres_url, mlflow_uri, study_name, write_config,
                                                                 tiny_space):
    # Trials of 30 epochs, and a victim with at most 10 behind it: it cannot finish between being
    # read and being killed, even on a busy machine (8-epoch trials sometimes did). 16 trials: the
    # survivor still starts trials after the victim's heartbeat went stale (2 s); with 8, trials
    # that share their structure's train step (~0.3 s) used up the budget first.
    path = write_config(slow_config(tiny_space, 16, epochs=30))
    proc = run_cli(str(path), "--storage", postgres_url, "--study-name", study_name, "--workers", "2",
                   env={**stack_env(mlflow_uri), "HEARTBEAT_SECONDS": "1"})
    try:
        def victim():
            ts = trials(postgres_url, study_name)
            running = [t for t in ts if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs
                       and len(t.intermediate_values) <= 10
                       and t.user_attrs.get("worker", "").endswith(tuple(f":{p}" for p in _children(proc.pid)))]
            return finished(ts) and running and running[0]

        target = wait_for(victim, what="a running trial after a finished one")
        os.kill(int(target.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, err
    assert "died on SIGKILL" in err
    ts = assert_clean_end(postgres_url, study_name, mlflow_uri, 16)
    killed = ts[target.number]
    assert killed.state.name == "FAIL"
    # The survivor noticed the missing heartbeat, failed the trial and ran it again.
    retries = [t for t in ts if t.user_attrs.get("retry_of") == target.number]
    assert retries and retries[0].params == killed.params and retries[0].state.name in FINISHED
    run = MlflowClient(mlflow_uri).get_run(target.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "no heartbeat" in run.data.tags["workbench.fail_reason"]
    retry_run = MlflowClient(mlflow_uri).get_run(retries[0].user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["workbench.retry_of"] == str(target.number)


@pytest.mark.exclusive  # restarts PostgreSQL
def test_postgres_restart_mid_study(postgres_url, mlflow_uri, study_name, write_config, tiny_space):
    path = write_config(slow_config(tiny_space, 8))
    proc = run_cli(str(path), "--storage", postgres_url, "--study-name", study_name, "--workers", "2",
                   env=stack_env(mlflow_uri))
    try:
        wait_for(lambda: len(finished(trials(postgres_url, study_name))) >= 2, what="two finished trials")
        restart = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "restart"],
                                 capture_output=True, text=True, timeout=120)
        assert restart.returncode == 0, restart.stderr
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, err
    assert "Traceback" not in err
    assert_clean_end(postgres_url, study_name, mlflow_uri, 8)


def test_sigterm_fails_running_trials_then_the_study_resumes(postgres_url, mlflow_uri, study_name, write_config,
                                                              tiny_space):
    # Trials of 200 epochs: an 8-epoch trial's epochs now pass faster than this test polls.
    path = write_config(slow_config(tiny_space, 8, epochs=200))
    args = (str(path), "--storage", postgres_url, "--study-name", study_name, "--workers", "2")
    proc = run_cli(*args, env={**stack_env(mlflow_uri), "CURVE_SECONDS": "0"})  # each epoch seen as it ends
    try:
        # A trial in training (some epochs reported, most to come), not one being told or just asked.
        wait_for(lambda: finished(ts := trials(postgres_url, study_name)) and any(
            t.state.name == "RUNNING" and 1 <= len(t.intermediate_values) <= 100 for t in ts),
                 what="a finished trial and a running one in training")
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, timeout=120)
    finally:
        proc.kill()
    assert code == 143, err
    ts = trials(postgres_url, study_name)
    interrupted = [t for t in ts if t.user_attrs.get("fail_reason") == "interrupted (SIGTERM)"]
    assert interrupted and all(t.state.name == "FAIL" for t in interrupted), err
    assert not [t.number for t in ts if t.state.name == "RUNNING"], err
    client = MlflowClient(mlflow_uri)
    parents, children = runs_of(client, study_name)
    assert parents[0].info.status == "KILLED"
    assert not [r for r in children if r.info.status == "RUNNING"]
    # The same command resumes and completes the budget.
    code, out, err = finish(run_cli(*args, env=stack_env(mlflow_uri)))
    assert code == 0, err
    assert_clean_end(postgres_url, study_name, mlflow_uri, 8)


def test_cut_database_connections_are_retried_and_recorded(postgres_url, mlflow_uri, study_name, write_config,
                                                           tiny_space):
    """Connections between the workers and PostgreSQL are cut for 3 s (a failover, a NAT reset):
    the storage calls are retried, the trials go on, and the retries show on the trials and runs."""
    from sqlalchemy.engine import make_url

    real = make_url(postgres_url)
    with Proxy(real.host, real.port or 5432) as proxy:
        url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        # Trials of 150 epochs (~3 s each): those left after the first outlive the outage, so a trial
        # is always reporting epochs while the connections are cut (30-epoch trials of ~0.8 s could
        # all end first, or the cut fall between trials, once trials got cheaper).
        path = write_config(slow_config(tiny_space, 4, epochs=150))
        proc = run_cli(str(path), "--storage", url, "--study-name", study_name, "--workers", "2",
                       env={**stack_env(mlflow_uri), "CURVE_SECONDS": "0"})  # each epoch's report a write, as it ends
        try:
            # A trial mid-training with at least 100 epochs (~2 s) to go: its epoch reports fall in the
            # outage (waiting for "a finished and a running trial" could catch the running one in its
            # last epoch and the next one not started, so that only the runner's own calls were cut).
            wait_for(lambda: any(t.state.name == "RUNNING" and 2 <= len(t.intermediate_values) <= 50
                                 for t in trials(postgres_url, study_name)),
                     what="a trial between its 2nd and 50th epoch")
            proxy.outage(3.0)
            code, _, err = finish(proc)
        finally:
            proc.kill()
    assert code == 0, err
    ts = assert_clean_end(postgres_url, study_name, mlflow_uri, 4)
    retried = [t for t in ts if t.user_attrs.get("transient_retries")]
    assert retried, f"no trial recorded a retried storage call; the study's stderr:\n{err[-4000:]}"
    entry = retried[0].user_attrs["transient_retries"][0]
    assert entry.startswith("storage.") and "OperationalError" in entry
    run = MlflowClient(mlflow_uri).get_run(retried[0].user_attrs["mlflow_run_id"])
    assert "OperationalError" in run.data.tags["workbench.retries"]


# -- helpers -----------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[-1]


class Proxy:
    """A TCP proxy on loopback whose `outage(seconds)` drops every connection and refuses new
    ones for that long: the network failing between a worker and its database."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._down_until = 0.0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self) -> Proxy:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._drop_all()
        self._server.close()

    def outage(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._conns.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if time.monotonic() < self._down_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
