"""Where the infrastructure is: read once from the environment into one settings object."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Environment settings; a study config may name a storage, the environment overrides it."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    optuna_storage: str | None = Field(default=None, description="Optuna storage URL (OPTUNA_STORAGE)")
    workbench_home: Path = Field(default=Path(".workbench"), description="project data folder (WORKBENCH_HOME)")
    tf_threads: int | None = Field(default=None, ge=1, description="TensorFlow intra/inter-op threads (TF_THREADS)")
    heartbeat_seconds: int = Field(default=30, ge=1, description="seconds between trial heartbeats (HEARTBEAT_SECONDS); "
                                   "a trial is reclaimed after two missed beats")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow tracking URI (MLFLOW_TRACKING_URI)")

    def default_storage(self) -> str:
        """The embedded default: one SQLite file inside the project data folder."""
        return f"sqlite:///{(self.workbench_home / 'optuna.db').resolve()}"

    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI, else the embedded default: SQLite in the project data folder."""
        return self.mlflow_tracking_uri or f"sqlite:///{(self.workbench_home / 'mlflow.db').resolve()}"

    def artifact_root(self) -> str | None:
        """Where a new experiment keeps artifacts: a local folder for the embedded default; the
        server decides (its --artifacts-destination, e.g. S3) when a tracking server is used."""
        if self.tracking_uri().startswith(("http://", "https://", "databricks")):
            return None
        return (self.workbench_home / "mlartifacts").resolve().as_uri()
