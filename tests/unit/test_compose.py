"""compose.yaml stays consistent with the code and .env.example (no Docker engine needed)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
VARS = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "compose.yaml").read_text()))
EXAMPLE = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}


def test_every_compose_variable_is_in_env_example():
    assert VARS <= EXAMPLE, VARS - EXAMPLE


def test_study_and_dashboard_get_the_storage_the_code_reads():
    from studies.settings import Settings

    assert "optuna_storage" in Settings.model_fields
    for name in ("study", "dashboard"):
        assert "OPTUNA_STORAGE" in COMPOSE["services"][name]["environment"]
        assert COMPOSE["services"][name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_study_logs_to_the_tracking_server_and_mlflow_writes_to_minio():
    study, mlflow = COMPOSE["services"]["study"], COMPOSE["services"]["mlflow"]
    assert study["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert study["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    command = " ".join(mlflow["entrypoint"])
    assert "--artifacts-destination" in command and "--allowed-hosts" in command
    assert "--disable-security-middleware" not in command
    # Same server flags as the native stack script that CI runs.
    script = (ROOT / "scripts" / "services.sh").read_text()
    for flag in ("--artifacts-destination", "--workers 2", "--allowed-hosts", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false"):
        assert flag in script and flag.split("=")[0] in command + str(mlflow["environment"])
    assert COMPOSE["services"]["buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_postgres_has_a_health_check_and_binds_loopback():
    pg = COMPOSE["services"]["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert all(p.startswith("127.0.0.1:") for s in COMPOSE["services"].values() for p in s.get("ports", []))


def test_the_study_command_names_a_shipped_config():
    default = re.search(r":-([^}]+)\}", COMPOSE["services"]["study"]["command"][0]).group(1)
    assert (ROOT / default).is_file()
