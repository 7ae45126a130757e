"""The whole compose stack through scripts/stack.sh: up -> study job -> select -> API answers -> down,
driven by the README's `stack` blocks (tests/readme.py), so the commands shown there are the ones run.

It runs last (tests/integration/conftest.py orders it), since `down` stops the services the other
integration tests use; if they were running before, it brings them back afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, tiny_config
from tests.readme import Command, readme_blocks, with_tiny_budget

pytestmark = pytest.mark.exclusive  # `down` stops the services the other tests use

SCRIPT = ROOT / "scripts" / "stack.py"
STATE = ROOT / ".workbench" / "stack"
PORTS = {"mlflow": 5000, "dashboard": 8080, "api": 8000, "minio": 9000}


def stack(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def http(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def stack_processes() -> list[psutil.Process]:
    """Every process the script started (each pid file's process and all its descendants)."""
    found = []
    for pidfile in STATE.glob("*.pid"):
        try:
            parent = psutil.Process(int(pidfile.read_text()))
            found += [parent, *parent.children(recursive=True)]
        except (psutil.NoSuchProcess, ValueError):
            pass
    return found


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stack_commands() -> tuple[list[Command], list[Command]]:
    """The README's `stack` blocks: (the scripts/stack.sh walk-through, the runner commands on the
    stack's PostgreSQL), as written there."""
    blocks = [b for b in readme_blocks(ROOT / "README.md") if b.kind == "stack"]
    walk = [b for b in blocks if any(c.text.startswith("scripts/stack.sh up") for c in b.commands)]
    assert len(walk) == 1, "README.md needs one stack block that runs scripts/stack.sh up ... down"
    others = [c for b in blocks if b is not walk[0] for c in b.commands]
    assert others and all(c.text.startswith("python -m studies.run") for c in others), others
    return list(walk[0].commands), others


def readme(command: Command, env: dict[str, str], *, timeout: float = 600) -> subprocess.CompletedProcess:
    """One README command in bash from the repository root, the venv activated (as the README says)."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    done = subprocess.run(["bash", "-c", with_tiny_budget(command.text)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"README.md:{command.line}: {command.text}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_stack_up_study_select_serve_down(tmp_path, tiny_space, write_config):
    """README's native-stack block, command by command, with checks before its `down`; the
    README's PostgreSQL runner commands run there too, in the stack's environment."""
    import mlflow
    import optuna
    from optuna.trial import TrialState

    from models import load_dataset

    COMPLETE, PRUNED = TrialState.COMPLETE, TrialState.PRUNED
    walk, runner_commands = stack_commands()
    assert [c.text.split("#")[0].split() for c in walk][-1] == ["scripts/stack.sh", "down"]
    tag = uuid.uuid4().hex[:8]
    study_name, model_name = f"stack_{tag}", f"stack_model_{tag}"
    config = write_config(tiny_config(tiny_space, study={"name": study_name, "seed": 3},
                                      registry={"model_name": model_name}))
    # Only what a user sets: everything else comes from .env / .env.example, as for compose.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(STUDY_CONFIG=str(config), SERVING_MODEL_URI=f"models:/{model_name}@champion")
    processes: list[psutil.Process] = []
    was_up = listening(PORTS["mlflow"])  # `make test` started the services the other tests use
    outputs: dict[str, str] = {}
    try:
        for command in walk[:-1]:
            outputs[command.text.split("#")[0].strip()] = readme(command, env).stdout
        up = outputs["scripts/stack.sh up"]
        assert "study: exited 0" in up and f"registered as {model_name} v1" in up, up[-3000:]
        status = outputs["scripts/stack.sh status"]
        for name in ("postgres", "minio", "mlflow", "dashboard", "api"):
            assert re.search(rf"^{name}\s+healthy", status, re.M), status
        assert re.search(r"^study\s+exited 0", status, re.M) and re.search(r"^buckets\s+exited 0", status, re.M)
        assert "api" in outputs["scripts/stack.sh plan"] and outputs["scripts/stack.sh logs api"].strip()

        client = dict(line.removeprefix("export ").split("=", 1) for line in stack("env", env=env).stdout.splitlines())
        # The study job ran on the stack's PostgreSQL database and logged to its MLflow server...
        study = optuna.load_study(study_name=study_name, storage=client["OPTUNA_STORAGE"])
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
        mlflow_client = mlflow.MlflowClient(tracking_uri=client["MLFLOW_TRACKING_URI"])
        champion = mlflow_client.get_model_version_by_alias(model_name, "champion")
        assert champion.tags["workbench.study"] == study_name
        # ...whose artifacts went to the S3 bucket.
        import boto3

        s3 = boto3.client("s3", endpoint_url=client["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=client["AWS_ACCESS_KEY_ID"], aws_secret_access_key=client["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=client["MLFLOW_BUCKET"]).get("Contents", [])]
        assert any(f"/{champion.run_id}/artifacts/" in key for key in keys), keys[:10]

        # The dashboard shows the study; the API serves the champion.
        studies = http(f"http://127.0.0.1:{PORTS['dashboard']}/api/studies")["study_summaries"]
        assert study_name in [s["study_name"] for s in studies]
        rows = load_dataset(name="breast_cancer", seed=1).x_test[:5]
        answer = http(f"http://127.0.0.1:{PORTS['api']}/predict", {"instances": rows.tolist()})
        assert answer["model_name"] == model_name and answer["model_version"] == champion.version
        assert len(answer["predictions"]) == 5

        # The README's runner commands on PostgreSQL, after `eval "$(scripts/stack.sh env)"` as it says
        # (fresh studies: a study left by an earlier run could hold another search space).
        for name in ("bc-pg", "digits_cnn"):
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=name, storage=client["OPTUNA_STORAGE"])
        for command in runner_commands:
            eval_env = Command(command.line, f'eval "$(scripts/stack.sh env)" && {with_tiny_budget(command.text)}')
            ran = readme(eval_env, env).stdout
            assert re.search(r"registered as \S+ v\d+", ran), ran[-3000:]
        for name in ("bc-pg", "digits_cnn"):
            finished = optuna.load_study(study_name=name, storage=client["OPTUNA_STORAGE"]).get_trials(states=(COMPLETE, PRUNED))
            assert len(finished) >= 2, name

        processes = stack_processes()
        assert len(processes) >= 4  # moto, the MLflow server and its workers, the dashboard, the API
    finally:
        down = readme(walk[-1], env, timeout=120).stdout
    for name in ("api", "dashboard", "mlflow", "minio"):
        assert f"{name}: stopped" in down
    left = [p for p in processes if running(p)]
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert not list(STATE.glob("*.pid"))
    for name, port in PORTS.items():
        assert not listening(port), f"{name} still listens on {port}"
    assert "down" in stack("status", env=env).stdout.split("mlflow", 1)[1].splitlines()[0]
    # Like MinIO's volume, the S3 stand-in's folder keeps the artifacts: after the next `up` the
    # registered champion loads again.
    assert list((STATE / "volumes" / "minio" / client["MLFLOW_BUCKET"]).rglob(f"*/{champion.run_id}/artifacts/*"))
    again = stack("up", "mlflow", env=env)
    try:
        assert again.returncode == 0 and "restored" in again.stdout, again.stdout + again.stderr
        mlflow.set_tracking_uri(client["MLFLOW_TRACKING_URI"])
        model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
        assert model.predict(rows).shape[0] == 5
    finally:
        if not was_up:
            stack("down", env=env, timeout=120)
