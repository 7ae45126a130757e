"""Where the model and MLflow are, and the serving limits: from the environment.

`MlflowLocation` is the one resolution of MLflow's tracking and registry URIs for every command
(studies and serving alike). MLflow's own process-wide default (`./mlflow.db` in the working
folder) is never used: every client and download gets these URIs explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class MlflowLocation(BaseSettings):
    """The project data folder and MLflow's tracking and registry URIs."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    workbench_home: Path = Field(default=Path(".workbench"), description="project data folder (WORKBENCH_HOME)")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow tracking URI (MLFLOW_TRACKING_URI)")
    mlflow_registry_uri: str | None = Field(default=None, description="MLflow registry URI (MLFLOW_REGISTRY_URI)")

    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI, else the embedded default: SQLite in the project data folder."""
        return self.mlflow_tracking_uri or f"sqlite:///{(self.workbench_home / 'mlflow.db').resolve()}"

    def registry_uri(self) -> str:
        """MLFLOW_REGISTRY_URI, else the tracking URI (the registry lives in the same store)."""
        return self.mlflow_registry_uri or self.tracking_uri()


class ServingSettings(MlflowLocation):
    """Environment settings of the API and of batch scoring."""

    serving_model_uri: str | None = Field(default=None, description="SERVING_MODEL_URI: the model to serve; unset: "
                                          "the one registered model with a @champion")
    serving_max_rows: int = Field(default=10_000, ge=1, description="rows per request")
    serving_max_body_bytes: int = Field(default=10_000_000, ge=1024, description="request body size")
    serving_poll_seconds: float = Field(default=0.0, ge=0, description="follow the alias every N s (0: off)")
    serving_model_versions: list[str] = Field(
        default_factory=list, description="SERVING_MODEL_VERSIONS: versions of the same registered model to hold too, "
        "addressed by /v2/models/<name>/versions/<v> (JSON list, e.g. [\"3\", \"5\"])")
    serving_shadow_alias: str | None = Field(default=None, description="SERVING_SHADOW_ALIAS: the alias (e.g. challenger) "
                                             "that scores a share of live traffic after the champion has answered")
    serving_shadow_fraction: float = Field(default=0.1, ge=0, le=1, description="share of requests scored in the shadow")
    serving_shadow_log_seconds: float = Field(default=60.0, gt=0, description="log shadow evidence to MLflow every N s")
    serving_metrics: bool = Field(default=True, description="GET /metrics (Prometheus) and the request metrics")
    serving_access_log: bool = Field(default=True, description="one log line per request (with its request id)")
    serving_access_log_flush_seconds: float = Field(
        default=1.0, ge=0, description="SERVING_ACCESS_LOG_FLUSH_SECONDS: access lines are written together at most this "
        "long after the first of them (nginx's flush=); 0: each line at once")
    serving_log_format: Literal["text", "json"] = Field(default="text", description="SERVING_LOG_FORMAT: text or json")
    serving_admin_token: SecretStr | None = Field(
        default=None, description="SERVING_ADMIN_TOKEN: when set, /reload needs 'Authorization: Bearer <token>'")
    serving_shutdown_seconds: float = Field(default=30.0, gt=0, description="SIGTERM: time in-flight requests get to finish")
    serving_host: str = "127.0.0.1"
    serving_port: int = Field(default=8000, ge=1, le=65535)
    serving_workers: int = Field(default=1, ge=1)
