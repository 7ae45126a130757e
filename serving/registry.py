"""Serving's one contact with MLflow: resolve a model URI, fetch its files, log batch-scoring runs."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ServingError(Exception):
    """Root of the errors serving raises on purpose."""


class ModelNotFound(ServingError):
    """The model URI does not resolve to a model with files."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI pinned to one version, with what the registry knows about it."""

    uri: str
    name: str | None
    version: str | None
    alias: str | None
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


class Store:
    """Resolves model URIs against the tracking server and downloads model files."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def resolve(self, uri: str) -> ResolvedModel:
        """Pin `models:/name@alias` or `models:/name/3` to a version; other URIs pass through."""
        match = _MODELS_URI.match(uri)
        if match is None:
            return ResolvedModel(uri, None, None, None, None)
        name, alias, version = match["name"], match["alias"], match["version"]
        try:
            mv = self.client.get_model_version_by_alias(name, alias) if alias else self.client.get_model_version(name, version)
        except Exception as e:
            raise ModelNotFound(f"cannot resolve {uri} at {self.tracking_uri}: {_first_line(e)}") from None
        return ResolvedModel(uri, name, str(mv.version), alias, mv.run_id, dict(mv.tags))

    def current_version(self, uri: str) -> str | None:
        """The version an alias URI points at now (cheap: one request)."""
        return self.resolve(uri).version

    def download(self, resolved: ResolvedModel) -> Path:
        """The model's files (MLmodel, data/model.keras, ...) in a local temporary folder."""
        import mlflow.artifacts

        target = tempfile.mkdtemp(prefix="workbench-serving-")
        source = f"models:/{resolved.name}/{resolved.version}" if resolved.version else resolved.uri
        if Path(source).exists():
            return Path(source)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=target, tracking_uri=self.tracking_uri))
        except Exception as e:
            raise ModelNotFound(f"cannot download {source} from {self.tracking_uri}: {_first_line(e)}") from None

    def log_batch_run(self, *, params: dict[str, Any], metrics: dict[str, float], tags: dict[str, str],
                      experiment: str = "batch-scoring") -> str:
        """Record one batch-scoring job as an MLflow run; returns its id."""
        from mlflow.entities import Metric, Param

        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        run = self.client.create_run(exp_id, run_name=tags.get("workbench.job", "batch"), tags=tags)
        now = int(__import__("time").time() * 1000)
        self.client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                              params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id, status="FINISHED")
        return run.info.run_id


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
