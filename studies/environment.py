"""Where the infrastructure is: read once from the environment into one settings object."""

from __future__ import annotations

from pydantic import Field

from serving.settings import MlflowLocation
from studies.storage.running import FLUSH_SECONDS


class Settings(MlflowLocation):
    """Environment settings; a study config may name a storage, the environment overrides it.

    The project data folder and MLflow's URIs come from `MlflowLocation`, the same resolution
    serving uses, so a model registered here is found there."""

    optuna_storage: str | None = Field(default=None, description="Optuna storage URL (OPTUNA_STORAGE)")
    tf_threads: int | None = Field(default=None, ge=1, description="TensorFlow intra/inter-op threads (TF_THREADS)")
    workbench_verbose: bool = Field(default=False, description="libraries' own logging (WORKBENCH_VERBOSE, set by --verbose)")
    heartbeat_seconds: int = Field(default=30, ge=1, description="seconds between trial heartbeats (HEARTBEAT_SECONDS); "
                                   "a trial is reclaimed after two missed beats")
    curve_seconds: float = Field(default=FLUSH_SECONDS, ge=0, description="a running trial's per-epoch values and rungs "
                                 "reach the storage with its next write, or this many seconds after its last (CURVE_SECONDS); "
                                 "0: each at once")
    trace_cache: bool = Field(default=True, description="keep the shared epoch functions traced for each network structure "
                              "under <WORKBENCH_HOME>/cache/traces, for later studies and other workers to load "
                              "(TRACE_CACHE; models.trace_cache)")
    trace_cache_mb: int = Field(default=256, ge=1, description="the trace cache's size bound: the least recently used "
                                "traces beyond it are removed when a new one is written (TRACE_CACHE_MB)")

    def default_storage(self) -> str:
        """The embedded default: one SQLite file inside the project data folder."""
        return f"sqlite:///{(self.workbench_home / 'optuna.db').resolve()}"

    def storage_url(self, flag: str | None = None, configured: str | None = None) -> str:
        """The Optuna storage, by precedence: --storage, then OPTUNA_STORAGE, then the config's
        study.storage, then the embedded default."""
        return flag or self.optuna_storage or configured or self.default_storage()

    def artifact_root(self) -> str | None:
        """Where a new experiment keeps artifacts: a local folder for the embedded default; the
        server decides (its --artifacts-destination, e.g. S3) when a tracking server is used."""
        if self.tracking_uri().startswith(("http://", "https://", "databricks")):
            return None
        return (self.workbench_home / "mlartifacts").resolve().as_uri()
