"""The built images, run for real (podman, or Docker where its engine runs): the workbench image
runs a tiny study on a mounted volume and registers the champion; the numpy serving image (no
TensorFlow in it, at most 500 MB) loads that model and answers /predict, /ready and its
HEALTHCHECK; the TensorFlow serving image gives the same answers, and serves a CNN that the numpy
image refuses naming it; a study stopped with SIGTERM mid-trial exits 143 and resumes. CI builds
the images first (scripts/images.sh); elsewhere the test skips without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
UID = 10001  # the images' user: a bind-mounted folder must be theirs
TINY = ["configs/breast_cancer.yaml", "--set", "training.epochs=2", "--set", "sampler.options={}", "--set", "sampler.type=random"]


IMAGES: dict[str, str] = {}  # target -> image name (scripts/images.sh tags), filled by the `engine` fixture


def _images(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "images.sh"), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def engine() -> list[str]:
    IMAGES.update(line.split("=") for line in _images("tags").stdout.split())
    found = _images("engine").stdout.split()
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "scripts" / "containers.conf"))  # podman on these machines
    missing = [image for image in IMAGES.values()
               if subprocess.run([*found, "image", "inspect", image], capture_output=True).returncode != 0] if found else [
        "a container engine (podman or docker)"]
    if missing:
        message = f"not built: {', '.join(missing)} (scripts/images.sh setup && scripts/images.sh build)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("volume")
    os.chown(folder, UID, UID)
    return folder


def _run(engine, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*engine, "run", "--rm", "--init", "--network", "host", *args],
                          capture_output=True, text=True, timeout=timeout)



def _get(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def study(engine, data) -> Path:
    done = _run(engine, "-v", f"{data}:/data", IMAGES["workbench"], *TINY, "--n-trials", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered" in done.stdout + done.stderr
    return data


def test_dask_in_the_workbench_image_reads_the_batch_settings(engine):
    """compose's dask profile runs `dask worker` from the workbench image: it reads
    /etc/dask/workbench.yaml, the settings the local cluster of `--engine dask` uses too."""
    code = ("import dask, distributed; from serving.batch.cluster import worker_settings; "  # distributed adds its defaults
            "env = dask.config.get('distributed.nanny.pre-spawn-environ'); "
            "assert env['MALLOC_TRIM_THRESHOLD_'] is None and env['OPENBLAS_NUM_THREADS'] == 1, env; "
            "assert all(dask.config.get(k) == v for k, v in worker_settings().items()); print('ok')")
    done = _run(engine, "--entrypoint", "python", IMAGES["workbench"], "-c", code, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


class Server:
    def __init__(self, engine, image: str, data: Path, model_uri: str) -> None:
        self.engine, self.port, self.name = engine, free_port(), f"wb-{uuid.uuid4().hex[:8]}"
        self.started = time.perf_counter()
        subprocess.run([*engine, "run", "-d", "--init", "--network", "host", "--name", self.name, "-v", f"{data}:/data",
                        "-e", f"SERVING_PORT={self.port}", "-e", f"SERVING_MODEL_URI={model_uri}", image],
                       check=True, capture_output=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def ready_seconds(self, limit: float = 120) -> float:
        while time.perf_counter() - self.started < limit:
            try:
                _get(f"{self.url}/ready")
                return time.perf_counter() - self.started
            except urllib.error.HTTPError as e:
                raise AssertionError(f"not ready: {e.read().decode()[:2000]}") from None
            except OSError:
                time.sleep(0.05)
        logs = subprocess.run([*self.engine, "logs", self.name], capture_output=True, text=True)
        raise AssertionError(f"not ready in {limit} s: {logs.stdout[-2000:]}{logs.stderr[-2000:]}")

    def refusal(self, limit: float = 120) -> str:
        """What /ready says when the server is up but has no model (503)."""
        while time.perf_counter() - self.started < limit:
            try:
                _get(f"{self.url}/ready")
                raise AssertionError("the server loaded the model")
            except urllib.error.HTTPError as e:
                assert e.code == 503
                return json.loads(e.read())["detail"]
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"no answer in {limit} s")

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.engine, "exec", self.name, *command], capture_output=True, text=True)

    def healthcheck(self) -> int:
        if self.engine == ["podman"]:
            return subprocess.run(["podman", "healthcheck", "run", self.name], capture_output=True).returncode
        inspect = subprocess.run(["docker", "inspect", "--format", "{{json .Config.Healthcheck.Test}}", self.name],
                                 capture_output=True, text=True, check=True)
        return self.exec(*json.loads(inspect.stdout)[1:]).returncode  # ["CMD", ...]

    def stop(self) -> None:
        subprocess.run([*self.engine, "rm", "-f", self.name], capture_output=True)


ROWS = [[float(v) for v in range(1, 31)], [0.5] * 30]


def test_the_serving_images_answer_with_the_registered_champion(engine, study):
    size = int(subprocess.run([*engine, "image", "inspect", IMAGES["serving"], "--format", "{{.Size}}"],
                              capture_output=True, text=True, check=True).stdout)
    assert size <= 500e6, f"the numpy serving image is {size / 1e6:.0f} MB (at most 500)"
    answers = {}
    for target in ("serving", "serving-tf"):
        server = Server(engine, IMAGES[target], study, "models:/breast_cancer_mlp@champion")
        try:
            seconds = server.ready_seconds()
            print(f"{target}: container start to /ready {seconds:.2f} s")
            answers[target] = _get(f"{server.url}/predict", {"instances": ROWS})
            assert server.healthcheck() == 0
            model = _get(f"{server.url}/model")
            assert model["name"] == "breast_cancer_mlp" and model["version"] == "1"
            has_tf = server.exec("python", "-c", "import tensorflow").returncode == 0
            assert has_tf == (target == "serving-tf")
            if target == "serving":  # no training package, no build tool in the numpy image
                found = server.exec("python", "-c", "import importlib.util as u; print([m for m in "
                                    "('tensorflow', 'keras', 'optuna', 'sklearn', 'scipy', 'pandas', 'pip', 'setuptools') "
                                    "if u.find_spec(m)])")
                assert found.stdout.strip() == "[]", found.stdout + found.stderr
                assert server.exec("id", "-u").stdout.strip() == str(UID)
        finally:
            server.stop()
    assert answers["serving"]["predictions"] == answers["serving-tf"]["predictions"]
    assert answers["serving"]["probabilities"] == answers["serving-tf"]["probabilities"]


def test_a_cnn_is_served_by_the_tensorflow_image_and_refused_by_the_numpy_one(engine, study):
    done = _run(engine, "-v", f"{study}:/data", IMAGES["workbench"], "configs/digits.yaml", "--n-trials", "1",
                "--set", "training.epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    server = Server(engine, IMAGES["serving-tf"], study, "models:/digits_cnn@champion")
    try:
        server.ready_seconds()
        answer = _get(f"{server.url}/predict", {"instances": [[0.0] * 64, [8.0] * 64]})
        assert len(answer["predictions"]) == 2 and len(answer["probabilities"][0]) == 10
    finally:
        server.stop()
    server = Server(engine, IMAGES["serving"], study, "models:/digits_cnn@champion")
    try:
        refusal = server.refusal()
        assert "needs TensorFlow" in refusal and "serving-tf" in refusal, refusal
    finally:
        server.stop()


def test_a_study_stopped_with_sigterm_mid_trial_exits_143_and_resumes(engine, study):
    import optuna

    storage = f"sqlite:///{study / 'optuna.db'}"
    name = f"sigterm_{uuid.uuid4().hex[:6]}"
    long = ["--study-name", name, "--no-register", "--n-trials", "20", "--set", "training.epochs=400",
            "--set", "training.early_stopping_patience=null", "--set", "pruner.type=none", "--set", "pruner.options={}"]
    container = f"wb-{name}"
    subprocess.run([*engine, "run", "-d", "--init", "--network", "host", "--name", container, "-v", f"{study}:/data",
                    IMAGES["workbench"], *TINY, *long], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 180
        running = []
        while not running and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            except KeyError:
                continue
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        assert running, "no trial started in 180 s"
        subprocess.run([*engine, "stop", "-t", "60", container], check=True, capture_output=True)
        code = subprocess.run([*engine, "wait", container], capture_output=True, text=True).stdout.strip()
        assert code == "143", subprocess.run([*engine, "logs", container], capture_output=True, text=True).stderr[-3000:]
    finally:
        subprocess.run([*engine, "rm", "-f", container], capture_output=True)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    cut = [t for t in trials if t.number == running[0].number][0]
    assert cut.state == optuna.trial.TrialState.FAIL and "SIGTERM" in cut.user_attrs.get("fail_reason", "")
    finished = sum(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in trials)
    again = _run(engine, "-v", f"{study}:/data", IMAGES["workbench"], *TINY, *long[:3], "--n-trials", str(finished + 1),
                 "--set", "training.epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    assert len(resumed) == len(trials) + 1 and resumed[-1].state == optuna.trial.TrialState.COMPLETE
