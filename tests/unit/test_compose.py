"""compose.yaml against the code, .env.example, the Dockerfile and scripts/stack.py (which runs it
natively): no Docker engine needed. `docker compose config` runs too when the plugin is installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT


def _load_stack():
    spec = importlib.util.spec_from_file_location("workbench_stack", ROOT / "scripts" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


stack = _load_stack()
TEXT = (ROOT / "compose.yaml").read_text()
RAW = yaml.safe_load(TEXT)["services"]
EXAMPLE = stack.read_env_file(ROOT / ".env.example")
HOSTS = re.compile(r"(?:(?<=[/@,\s\"'])|^)(" + "|".join(RAW) + r")(?=:\d)")


def services(**variables):
    return stack.load_services({**EXAMPLE, **variables}, state=ROOT / ".workbench" / "stack-test")


SERVICES = services()


def compose_argv(name: str) -> list[str]:
    """What the container runs: the service's entrypoint/command, else its Dockerfile stage's."""
    spec = stack.interpolate_tree(RAW[name], EXAMPLE)
    stage = stack.read_dockerfile()[spec["build"]["target"]] if "build" in spec else None
    entrypoint = stack._as_argv(spec["entrypoint"]) if "entrypoint" in spec else stage.entrypoint
    command = stack._as_argv(spec["command"]) if "command" in spec else ([] if "entrypoint" in spec else stage.cmd)
    return entrypoint + command


def env_of(name: str) -> dict[str, str]:
    """A service's environment as the container sees it (Dockerfile stage ENV + compose environment)."""
    spec = stack.interpolate_tree(RAW[name], EXAMPLE)
    stage_env = stack.read_dockerfile()[spec["build"]["target"]].env if "build" in spec else {}
    return {**stage_env, **stack._environment(spec.get("environment"), EXAMPLE)}


# --------------------------------------------------------------------------- variables and secrets

def test_every_compose_variable_is_in_env_example_and_required_ones_fail_with_a_message():
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", TEXT))
    assert used <= set(EXAMPLE), used - set(EXAMPLE)
    required = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*):\?", TEXT))
    assert {"POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= required
    for name in required:
        with pytest.raises(stack.StackError, match=rf"{name}: set {name} in \.env"):
            stack.load_services({k: v for k, v in EXAMPLE.items() if k != name})


def test_no_credentials_are_committed():
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    # Every secret in compose.yaml comes from a variable, never a literal.
    for service in RAW.values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), (key, value)
    assert not re.search(r"://[^$/\s:]+:[^$@\s{]+@", TEXT), "a URL with a literal password"


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert stack.interpolate("$${SET} ${SET} $SET ${EMPTY:-d} ${EMPTY-d} ${NONE-d} ${NONE:-}", env, "w") == "${SET} x x d  d "
    with pytest.raises(stack.StackError, match="w: EMPTY: needs it"):
        stack.interpolate("${EMPTY:?needs it}", env, "w")
    assert stack.interpolate("${EMPTY?unused}", env, "w") == ""


def test_env_file_reading_matches_compose(tmp_path):
    path = tmp_path / ".env"
    path.write_text("# c\nA=1   # comment\nB='two # words'\nexport C=\"3\"\nD=\n")
    assert stack.read_env_file(path) == {"A": "1", "B": "two # words", "C": "3", "D": ""}


# --------------------------------------------------------------------------- health and order

def _is_job(name: str) -> bool:
    return not RAW[name].get("ports") and "healthcheck" not in RAW[name]


def test_every_long_running_service_has_a_health_check_and_dependents_wait_for_it():
    for name, spec in RAW.items():
        assert _is_job(name) or spec.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, cond in (spec.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if _is_job(dep) else "service_healthy"
            assert cond["condition"] == expected, (name, dep)
    assert "pg_isready" in " ".join(RAW["postgres"]["healthcheck"]["test"])
    assert "/ready" in " ".join(RAW["api"]["healthcheck"]["test"])


def test_a_service_depends_on_every_service_it_talks_to():
    def closure(name):
        deps = set(RAW[name].get("depends_on") or {})
        return deps.union(*(closure(d) for d in deps)) if deps else set()

    for name in RAW:
        talked_to = set(HOSTS.findall(" ".join(compose_argv(name)) if "build" in RAW[name] else ""))
        talked_to |= {m for v in env_of(name).values() for m in HOSTS.findall(v)}
        talked_to |= {v for k, v in env_of(name).items() if k.endswith("HOST") and v in RAW}
        assert talked_to - {name} <= closure(name), (name, talked_to - closure(name))
    assert {"mlflow", "study"} <= set(RAW["api"]["depends_on"])


def test_ports_bind_loopback_and_the_native_processes_listen_on_them():
    published = []
    for name, service in SERVICES.items():
        for port in service.ports:
            assert port.address == "127.0.0.1" and port.published == port.target, (name, port)
            published.append(port.published)
        if service.kind == "build" and service.ports:
            listens = " ".join(service.argv) + " " + " ".join(f"{k}={v}" for k, v in service.env.items())
            assert re.search(rf"(--port |_PORT=){service.ports[0].target}\b", listens), (name, listens)
            assert "0.0.0.0" not in listens  # natively: the published address only
    assert len(published) == len(set(published))


# --------------------------------------------------------------------------- the code's variables

def _fields(cls) -> set[str]:
    return {name.upper() for name in cls.model_fields}


def test_every_variable_the_code_reads_is_set_for_the_services_that_need_it():
    from serving.settings import ServingSettings
    from studies.config import load_config
    from studies.environment import Settings

    needs = {
        "study": (Settings, {"OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "WORKBENCH_HOME"}),
        "dashboard": (Settings, {"OPTUNA_STORAGE"}),
        "api": (ServingSettings, {"MLFLOW_TRACKING_URI", "SERVING_MODEL_URI", "SERVING_HOST", "SERVING_PORT"}),
    }
    for name, (settings, names) in needs.items():
        assert names <= _fields(settings), names - _fields(settings)  # the code still reads these
        assert names <= set(env_of(name)), (name, names - set(env_of(name)))
    study, api, dashboard = env_of("study"), env_of("api"), env_of("dashboard")
    assert study["OPTUNA_STORAGE"] == dashboard["OPTUNA_STORAGE"]
    assert study["MLFLOW_TRACKING_URI"] == api["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert api["SERVING_HOST"] == "0.0.0.0"
    # WORKBENCH_HOME is a volume, so a KerasTuner study's project folder survives the container.
    assert any(v.endswith(":" + study["WORKBENCH_HOME"]) for v in RAW["study"]["volumes"])
    # The config the job runs reads no variable it is not given, selects its winner at the end,
    # and the API serves that model.
    loaded = load_config(ROOT / compose_argv("study")[-1], environ=study)
    assert loaded.config.registry.auto
    model = loaded.config.registry.model_name or loaded.study_name
    assert api["SERVING_MODEL_URI"] == f"models:/{model}@champion"


def test_every_variable_a_service_sets_is_read_by_something():
    import botocore.configprovider
    import botocore.credentials
    import mlflow.environment_variables

    from serving.settings import ServingSettings
    from studies.environment import Settings

    botocore_text = "".join(open(m.__file__).read() for m in (botocore.configprovider, botocore.credentials))
    image_reads = {"postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
                   "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}}
    for name, spec in RAW.items():
        command = " ".join(compose_argv(name)) if "build" in spec else " ".join(
            stack._as_argv(spec.get("entrypoint")) + stack._as_argv(spec.get("command")))
        for key in stack._environment(spec.get("environment"), EXAMPLE):
            read = (key in _fields(Settings) | _fields(ServingSettings)
                    or re.search(rf"\${{?{key}\b", command.replace("$$", "$"))
                    or hasattr(mlflow.environment_variables, key)
                    or (key.startswith("AWS_") and f"'{key}'" in botocore_text)
                    or key in image_reads.get(name, set()))
            assert read, f"services.{name}.environment.{key}: nothing in that service reads it (a typo?)"


# --------------------------------------------------------------------------- the services themselves

def test_mlflow_server_uses_postgres_and_the_bucket_and_keeps_its_security_middleware():
    command = " ".join(compose_argv("mlflow"))
    env, minio, buckets = env_of("mlflow"), env_of("minio"), env_of("buckets")
    assert "--backend-store-uri \"postgresql+psycopg2://" in command and "/mlflow\"" in command
    assert '--artifacts-destination "s3://$MLFLOW_BUCKET/"' in command
    assert env["MLFLOW_BUCKET"] == buckets["MLFLOW_BUCKET"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == buckets["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    assert env["PGHOST"] == "postgres" and env["PGPASSWORD"] == env_of("postgres")["POSTGRES_PASSWORD"]
    allowed = re.search(r'--allowed-hosts "([^"]+)"', command).group(1).split(",")
    assert "mlflow:5000" in allowed  # the name the study and the API use
    assert "--disable-security-middleware" not in command and "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE" not in env


def test_the_init_script_creates_the_databases_the_services_use():
    sql = (ROOT / "scripts" / "postgres-init" / "01-databases.sql").read_text()
    created = set(re.findall(r"'CREATE DATABASE (\w+)'", sql))
    assert env_of("study")["OPTUNA_STORAGE"].rsplit("/", 1)[1] in created
    assert re.search(r"/(\w+)\"", " ".join(compose_argv("mlflow"))).group(1) in created
    assert all(f"NOT EXISTS (SELECT FROM pg_database WHERE datname = '{db}')" in sql for db in created)  # re-runnable


def test_the_study_job_is_the_runner_on_one_config_and_the_dashboard_shows_it():
    import inspect

    import studies.engines.runner

    job = compose_argv("study")
    assert job[:3] == ["python", "-m", "studies.run"] and len(job) == 4 and (ROOT / job[3]).is_file()
    assert "from studies.selection import select" in inspect.getsource(studies.engines.runner)  # the run ends by selecting
    # One process under init, so `docker compose stop` reaches the runner's SIGTERM handling.
    assert RAW["study"]["init"] is True and SERVICES["study"].stop_seconds >= 30
    assert compose_argv("dashboard") == ["python", "-m", "studies.dashboard", job[3], "--host", "0.0.0.0", "--port", "8080"]
    assert all(RAW[name].get("init") for name in RAW if "build" in RAW[name])


def test_bundled_services_can_be_replaced_by_existing_ones():
    external = services(COMPOSE_PROFILES="", POSTGRES_HOST="db.abc.eu-west-1.rds.amazonaws.com",
                        S3_ENDPOINT_URL="https://s3.eu-west-1.amazonaws.com", MLFLOW_BUCKET="team-artifacts")
    assert list(external) == ["mlflow", "dashboard", "study", "api"]
    assert external["mlflow"].depends_on == {}
    assert external["study"].env["OPTUNA_STORAGE"].endswith("@db.abc.eu-west-1.rds.amazonaws.com:5432/optuna")
    assert external["mlflow"].env["PGHOST"] == "db.abc.eu-west-1.rds.amazonaws.com"
    assert external["mlflow"].env["MLFLOW_S3_ENDPOINT_URL"] == "https://s3.eu-west-1.amazonaws.com"
    for name in ("postgres", "buckets"):  # dependencies on the bundled ones are optional
        assert all(RAW[s]["depends_on"][name].get("required") is False for s in RAW if name in (RAW[s].get("depends_on") or {}))


# --------------------------------------------------------------------------- compose vs the native script

def test_the_native_script_runs_what_compose_runs():
    assert list(SERVICES) == ["postgres", "minio", "buckets", "mlflow", "dashboard", "study", "api"]
    for name, service in SERVICES.items():
        spec = RAW[name]
        if "build" in spec:
            assert service.kind == "build" and service.source == stack.interpolate_tree(spec["build"], EXAMPLE)["target"]
            compose = compose_argv(name)
            assert len(service.argv) == len(compose)
            for native, container in zip(service.argv, compose, strict=True):
                translated = HOSTS.sub("127.0.0.1", container).replace("0.0.0.0", "127.0.0.1")
                assert native in (container, translated, translated.replace("/app", str(ROOT))), (name, native, container)
            assert set(service.env) == set(env_of(name)) - {"PATH"}
            for key, value in service.env.items():  # only host names, binds and container paths change
                assert not HOSTS.search(value) and "0.0.0.0" not in value, (name, key, value)
        else:
            assert service.kind == "stand-in" and service.source == spec["image"]
            assert spec["image"].rsplit(":", 1)[0] in stack.STAND_INS
    assert SERVICES["study"].job and SERVICES["buckets"].job and not SERVICES["mlflow"].job
    assert SERVICES["study"].env["OPTUNA_STORAGE"].endswith("@127.0.0.1:5432/optuna")
    assert SERVICES["study"].env["WORKBENCH_HOME"].startswith(str(ROOT / ".workbench"))
    assert SERVICES["mlflow"].env["PGHOST"] == "127.0.0.1" and SERVICES["mlflow"].env["PGUSER"] == "postgres"
    assert SERVICES["mlflow"].env["MLFLOW_BUCKET"] == "mlflow"


def test_dockerfile_entrypoints_are_the_commands_a_user_runs():
    stages = stack.read_dockerfile()
    assert stages["workbench"].entrypoint == ["python", "-m", "studies.run"]
    assert stages["serving"].entrypoint == ["python", "-m", "serving"]
    assert "command" not in RAW["api"] and "entrypoint" not in RAW["api"]
    assert stages["serving"].env["SERVING_PORT"] == "8000" == RAW["api"]["ports"][0].split(":")[-1]


def test_compose_uses_only_keys_the_native_script_mirrors():
    """A key the script ignored (working_dir, network_mode, a typo like `healtcheck`) would be drift."""
    known = {"image", "build", "command", "entrypoint", "environment", "volumes", "ports", "healthcheck", "depends_on",
             "profiles", "stop_grace_period",
             "init"}  # natively nothing runs as PID 1, and `down` signals the whole process group
    for name, spec in RAW.items():
        assert set(spec) <= known, (name, set(spec) - known)
        assert set(spec.get("healthcheck", {})) <= {"test", "interval", "timeout", "retries", "start_period"}, name
        for cond in (spec.get("depends_on") or {}).values():
            assert set(cond) <= {"condition", "required"}, name
    assert set(yaml.safe_load(TEXT)) <= {"name", "services", "volumes"} | {k for k in yaml.safe_load(TEXT) if k.startswith("x-")}


def test_the_native_script_refuses_what_it_cannot_mirror(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  web:\n    image: nginx:1\n")
    with pytest.raises(stack.StackError, match="no native stand-in for 'nginx:1'"):
        stack.load_services({}, compose_file=bad)
    bad.write_text("services:\n  api:\n    build: {context: ., target: serving}\n    ports: ['127.0.0.1:8001:8000']\n")
    with pytest.raises(stack.StackError, match="publish it on the port it listens on"):
        stack.load_services({}, compose_file=bad)
    bad.write_text("services:\n  a:\n    build: {context: ., target: nope}\n")
    with pytest.raises(stack.StackError, match="no stage 'nope'"):
        stack.load_services({}, compose_file=bad)


def test_up_refuses_a_port_another_process_holds(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        service = stack.Service("web", "build", "serving", False, ["sleep", "30"], {}, [stack.Port("127.0.0.1", port, port)],
                                None, 30, {})
        with pytest.raises(stack.StackError, match=f"port {port} is taken"):
            stack.Stack({"web": service}, tmp_path).start_background(service, service.argv)
    assert not (tmp_path / "web.pid").exists()


def test_a_failing_job_stops_up_before_its_dependents(tmp_path, capsys):
    job = stack.Service("job", "build", "workbench", True, ["sh", "-c", "echo boom; exit 3"], {}, [], None, 30, {})
    web = stack.Service("web", "build", "serving", False, ["sleep", "30"], {}, [], None, 30,
                        {"job": "service_completed_successfully"})
    with pytest.raises(stack.StackError, match="job exited with 3"):
        stack.Stack({"job": job, "web": web}, tmp_path).up(["web"])
    assert "job | boom" in capsys.readouterr().out
    assert (tmp_path / "job.exit").read_text() == "3" and not (tmp_path / "web.pid").exists()


def test_down_stops_the_whole_process_group(tmp_path):
    import psutil

    web = stack.Service("web", "build", "serving", False, ["sh", "-c", "sleep 60 & sleep 60"], {}, [], None, 30, {})
    s = stack.Stack({"web": web}, tmp_path)
    s.up([])
    parent = psutil.Process(int((tmp_path / "web.pid").read_text()))
    for _ in range(100):  # the shell needs a moment to start its two sleeps
        if len(children := parent.children(recursive=True)) == 2:
            break
        time.sleep(0.05)
    assert len(children) == 2
    s.down()
    for p in [parent, *children]:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "web.pid").exists()


def test_up_keeps_a_running_service_and_restarts_it_when_its_configuration_changed(tmp_path):
    web = stack.Service("web", "build", "serving", False, ["sleep", "60"], {"A": "1"}, [], None, 30, {})
    s = stack.Stack({"web": web}, tmp_path)
    try:
        s.up([])
        first = s.pid("web")
        s.up([])
        assert s.pid("web") == first
        web.env["A"] = "2"
        s.up([])
        assert s.pid("web") not in (None, first) and not stack.alive(first)
    finally:
        s.down()


def test_the_s3_stand_in_keeps_its_objects_in_the_volume_folder_across_restarts(tmp_path, monkeypatch):
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    folder = tmp_path / "volumes" / "minio"
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="mlflow")
        s3.create_bucket(Bucket="empty")
        s3.put_object(Bucket="mlflow", Key="1/run/artifacts/model/MLmodel", Body=b"flavors: {}")
        s3.put_object(Bucket="mlflow", Key="top", Body=b"t")
        assert stack._copy_s3_into_volume(s3, folder) == 2
    assert (folder / "mlflow" / "1/run/artifacts/model/MLmodel").read_bytes() == b"flavors: {}"
    with mock_aws():  # a fresh server: nothing until the folder is loaded back
        s3 = boto3.client("s3", region_name="us-east-1")
        assert stack._copy_volume_into_s3(s3, folder) == 2
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"mlflow", "empty"}
        assert s3.get_object(Bucket="mlflow", Key="1/run/artifacts/model/MLmodel")["Body"].read() == b"flavors: {}"
        s3.delete_object(Bucket="mlflow", Key="top")
        assert stack._copy_s3_into_volume(s3, folder) == 1  # the folder is replaced, not merged
    assert not (folder / "mlflow" / "top").exists() and not list(tmp_path.glob("volumes/*.saving"))


# --------------------------------------------------------------------------- the images

def test_images_are_pinned_non_root_and_without_build_tools():
    text = (ROOT / "Dockerfile").read_text()
    stages = stack.read_dockerfile()
    for name in ("workbench", "serving"):
        assert stages[name].user not in ("root", "0", ""), name
    installs = re.findall(r"pip install[^\n&]*", text)
    assert installs and all("-c constraints.txt" in i and "--only-binary=:all:" in i for i in installs)
    assert not re.search(r"apt-get|apk add|build-essential|gcc", text)


def test_the_build_context_leaves_out_secrets_and_local_state_but_not_what_the_images_copy():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".env", ".venv", ".workbench", ".git"} <= ignored
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert source.split("/")[0] not in ignored and any(ROOT.glob(source)), source


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
                    if shutil.which("docker") else True, reason="the docker compose plugin is not installed")
def test_docker_compose_config_accepts_the_file():
    done = subprocess.run(["docker", "compose", "--env-file", ".env.example", "config", "--quiet"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
