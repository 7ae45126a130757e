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
    heartbeat_interval: int = Field(default=60, ge=1, description="seconds between trial heartbeats")

    def default_storage(self) -> str:
        """The embedded default: one SQLite file inside the project data folder."""
        return f"sqlite:///{(self.workbench_home / 'optuna.db').resolve()}"
