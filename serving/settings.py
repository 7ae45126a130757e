"""Where the model and the tracking server are, and the serving limits: from the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServingSettings(BaseSettings):
    """Environment settings of the API and of batch scoring."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    serving_model_uri: str = Field(default="models:/breast_cancer_mlp@champion", description="SERVING_MODEL_URI")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLFLOW_TRACKING_URI")
    workbench_home: Path = Field(default=Path(".workbench"), description="WORKBENCH_HOME (embedded default)")
    serving_max_rows: int = Field(default=10_000, ge=1, description="rows per request")
    serving_max_body_bytes: int = Field(default=10_000_000, ge=1024, description="request body size")
    serving_poll_seconds: float = Field(default=0.0, ge=0, description="follow the alias every N s (0: off)")
    serving_host: str = "127.0.0.1"
    serving_port: int = Field(default=8000, ge=1, le=65535)
    serving_workers: int = Field(default=1, ge=1)

    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI, else the embedded SQLite store that `studies.run` writes by default."""
        return self.mlflow_tracking_uri or f"sqlite:///{(self.workbench_home / 'mlflow.db').resolve()}"
