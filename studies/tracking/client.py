"""MLflow plumbing every tracking module shares: a client with both URIs explicit, bounded
retries of one logging step, the server check, experiments, and metric and tag entities."""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import WorkbenchError
from models.faults import RetryLog, describe, retry_call
from serving.store import one_opener_at_a_time, sqlite_file

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Requests to a tracking server fail fast instead of MLflow's default minutes of retrying;
# our own retry below bounds each logging step.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
RETRY_ATTEMPTS = 5  # with RETRY_DELAY 1 s: waits 1, 2, 4, 8 s, enough for a server or S3 restart
RETRY_DELAY = 1.0




class TrackingError(WorkbenchError):
    """The tracking server or its artifact store cannot be used."""


def retry_step(action: Callable[[], Any], what: str, log: RetryLog | None = None) -> Any:
    """Run one logging step; transient errors (connection refused, 5xx, S3 unreachable) are
    retried RETRY_ATTEMPTS times in all with backoff, anything else fails at once."""
    try:
        return retry_call(action, what, attempts=RETRY_ATTEMPTS, delay=RETRY_DELAY, log=log)
    except Exception as e:
        raise TrackingError(f"{what} failed: {describe(e)}") from e



def mlflow_client(tracking_uri: str, registry_uri: str | None = None, *, check: bool = False) -> MlflowClient:
    """A client on these URIs (nothing falls back to MLflow's process-wide default, ./mlflow.db),
    with requests that fail fast; `check`: a tracking server must answer /health first."""
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    if check and tracking_uri.startswith(("http://", "https://")):
        check_http(tracking_uri)
    database = sqlite_file(tracking_uri)
    if database is not None:  # the embedded store's folder (.workbench/) on first use
        database.parent.mkdir(parents=True, exist_ok=True)
    with one_opener_at_a_time(tracking_uri):  # serving.store's: both sides open the embedded store
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def git_commit(cwd: Path) -> str | None:
    """The checked-out commit, when the config lives in a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of the named experiment, created (or restored) if need be."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another worker created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def check_http(uri: str) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
            response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {uri} does not answer: {reason}") from None


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def metrics_of(values: dict[str, float], *, step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if _finite(v)]


def tags_of(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)[:8000]) for k, v in tags.items() if v is not None]
