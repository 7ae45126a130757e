"""`python -m studies.dashboard` on the real PostgreSQL: an Optuna study and a KerasTuner study of
the same space, side by side, read back through optuna-dashboard's HTTP API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import yaml

from tests.conftest import ROOT, free_port, tiny_config
from tests.integration.test_postgres_runner import HOME, finish, run_cli


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_dashboard_lists_optuna_and_kerastuner_studies(postgres_url, study_name, write_config, tiny_space):
    optuna_cfg = write_config(tiny_config(tiny_space, study={"name": f"{study_name}_optuna", "seed": 1},
                                          budget={"n_trials": 2}), "optuna.yaml")
    kt = tiny_config(tiny_space, study={"name": f"{study_name}_kt", "seed": 1}, engine="keras_tuner",
                     keras_tuner={"tuner": "hyperband", "options": {"factor": 2}}, budget={"n_trials": 3})
    del kt["sampler"], kt["pruner"]
    kt_cfg = write_config(kt, "kt.yaml")
    for cfg in (optuna_cfg, kt_cfg):
        code, _, err = finish(run_cli(str(cfg), "--storage", postgres_url, "--no-tracking"))
        assert code == 0, err

    port = free_port()
    env = {**os.environ, "WORKBENCH_HOME": HOME, "OPTUNA_STORAGE": postgres_url}
    proc = subprocess.Popen([sys.executable, "-m", "studies.dashboard", str(kt_cfg), "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_it_answers(proc, port)
        studies = {s["study_name"]: s for s in _get(f"{base}/api/studies")["study_summaries"]}
        assert {f"{study_name}_optuna", f"{study_name}_kt"} <= set(studies)
        kt_id = studies[f"{study_name}_kt"]["study_id"]
        detail = _get(f"{base}/api/studies/{kt_id}")
        trials = detail["trials"]
        assert len(trials) == 3 and {t["state"] for t in trials} == {"Complete"}
        assert all(t["intermediate_values"] for t in trials)  # the per-epoch curve shows in the dashboard
        params = {p["name"] for t in trials for p in t["params"]}
        assert {"n_layers", "units_0", "learning_rate", "optimizer"} <= params
        engine = [a for a in detail["user_attrs"] if a["key"] == "workbench:engine"]
        assert engine and engine[0]["value"] == "keras_tuner.hyperband"
        optuna_detail = _get(f"{base}/api/studies/{studies[f'{study_name}_optuna']['study_id']}")
        assert len(optuna_detail["trials"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert f"optuna-dashboard on http://127.0.0.1:{port}/dashboard" in out
    assert f"{study_name}_kt" in out and "<- this config" in out
    assert proc.returncode == 0, err


def test_dashboard_reports_a_port_in_use(postgres_url, write_config, tiny_space):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(yaml.safe_load(yaml.safe_dump(tiny_config(tiny_space))))
        proc = subprocess.run([sys.executable, "-m", "studies.dashboard", str(cfg), "--storage", postgres_url,
                               "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "WORKBENCH_HOME": HOME})
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_during_a_request_stops_the_dashboard(tmp_path, write_config, tiny_space):
    """Ctrl-C that lands while a response is being written (the 6 MB bundle to a client that does
    not read) ends the command with 0 once that request ends; wsgiref's handler used to swallow it
    and the dashboard served on."""
    proc, port = _start_on_sqlite(tmp_path, write_config(tiny_config(tiny_space)))
    try:
        with _stalled_download(port) as client:
            assert client.recv(64).startswith(b"HTTP/1.0 200")  # the response has begun and then stalls
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err


def test_a_second_ctrl_c_ends_a_dashboard_held_by_a_client(tmp_path, write_config, tiny_space):
    """A client that keeps its response unread holds the first Ctrl-C's stop; the second ends the
    process at once (130)."""
    proc, port = _start_on_sqlite(tmp_path, write_config(tiny_config(tiny_space)))
    try:
        with _stalled_download(port) as client:
            assert client.recv(64).startswith(b"HTTP/1.0 200")
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
            assert proc.poll() is None  # the first waits for the request in hand
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT


def _start_on_sqlite(tmp_path, cfg) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "studies.dashboard", str(cfg), "--port", str(port),
                             "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"], cwd=ROOT,
                            env={**os.environ, "WORKBENCH_HOME": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_it_answers(proc, port)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, port


@contextlib.contextmanager
def _stalled_download(port: int):
    """A request for the 6 MB bundle whose response the client does not read: the server is left
    writing it."""
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /static/bundle.js HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept-Encoding: identity\r\n\r\n")
        yield client


def _wait_until_it_answers(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(f"http://127.0.0.1:{port}/api/meta")
            return
        except OSError:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "optuna-dashboard did not answer within 60 s"
            time.sleep(0.3)
