"""Serving's one contact with MLflow: resolve a model URI, fetch its files, log batch-scoring runs.

`Store` is the one way a model URI becomes local files, for the API, batch scoring, the selector
and the notebook alike: `models:/name@alias`, `models:/name/3`, `runs:/<id>/model`, any artifact
URI MLflow knows, or a local model folder. Every lookup and download is given the tracking and
registry URIs explicitly, never MLflow's process-wide default.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import WorkbenchError

if TYPE_CHECKING:
    from serving.settings import MlflowLocation

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/")
_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")  # an MLflow 3 logged model id
_DOWNLOADED: set[Path] = set()  # the temporary folders `Store.download` made in this process, until discarded


class ServingError(WorkbenchError):
    """Root of the errors serving raises on purpose (under the project's root error)."""


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


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store URI (None for other stores and `:memory:`)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    return None if path.name == ":memory:" else path


@contextmanager
def one_opener_at_a_time(uri: str) -> Iterator[None]:
    """Around opening an MLflow client: a client on a SQLite store creates or migrates its schema
    when it opens it, and two processes doing that to one fresh file at once break each other's
    migration (the second finds the first's half-made tables). They take turns: an exclusive lock
    on a file beside the database. Other stores, and a folder where no lock file can be written
    (read-only, or missing: the opener then fails or proceeds as it would), pass through."""
    database = sqlite_file(uri)
    try:
        lock = open(database.with_name(database.name + ".lock"), "a") if database is not None else None
    except OSError:
        lock = None
    if lock is None:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Store:
    """Resolves model URIs against the registry and downloads model files, with both URIs explicit."""

    def __init__(self, tracking_uri: str, registry_uri: str | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        with one_opener_at_a_time(self.tracking_uri):  # a study may be opening the same fresh store
            self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    @classmethod
    def at(cls, location: MlflowLocation) -> Store:
        """The store the project's settings point at (MLFLOW_* variables, else the embedded one)."""
        return cls(location.tracking_uri(), location.registry_uri())

    def resolve(self, uri: str) -> ResolvedModel:
        """Pin `models:/name@alias` or `models:/name/3` to a version; other URIs pass through
        (a `runs:/<id>/...` URI keeps its run id)."""
        match = _MODELS_URI.match(uri)
        if match is None:
            runs = _RUNS_URI.match(uri)
            return ResolvedModel(uri, None, None, None, runs["run_id"] if runs else None)
        name, alias, version = match["name"], match["alias"], match["version"]
        try:
            mv = self.client.get_model_version_by_alias(name, alias) if alias else self.client.get_model_version(name, version)
        except Exception as e:
            raise ModelNotFound(f"cannot resolve {uri} at {self.registry_uri}: {_first_line(e)}") from None
        return ResolvedModel(uri, name, str(mv.version), alias, mv.run_id, dict(mv.tags))

    def default_uri(self) -> str:
        """The model to serve when SERVING_MODEL_URI is unset: the one registered model with a
        `@champion`; none or several is an error that lists them."""
        from mlflow.exceptions import MlflowException

        try:
            names = [m.name for m in self.client.search_registered_models(max_results=1000) if "champion" in (m.aliases or {})]
        except MlflowException as e:
            raise ModelNotFound(f"cannot list registered models at {self.registry_uri}: {_first_line(e)}") from None
        if len(names) == 1:
            return f"models:/{names[0]}@champion"
        found = f"models with a @champion: {', '.join(sorted(names))}" if names else "no registered model has a @champion yet"
        raise ModelNotFound(f"SERVING_MODEL_URI is not set and {found} at {self.registry_uri}; "
                            "set it, e.g. SERVING_MODEL_URI=models:/<name>@champion")

    def current_version(self, uri: str) -> str | None:
        """The version an alias URI points at now (cheap: one request)."""
        return self.resolve(uri).version

    def download(self, resolved: ResolvedModel) -> Path:
        """The model's files (MLmodel, data/model.keras, ...): a local model folder as it is, anything
        else downloaded into a new temporary folder, which the caller removes with `discard` once
        it no longer reads them (a failed download leaves nothing)."""
        import mlflow.artifacts

        if Path(resolved.uri).is_dir():
            return Path(resolved.uri)
        source = f"models:/{resolved.name}/{resolved.version}" if resolved.version else resolved.uri
        target = Path(tempfile.mkdtemp(prefix="workbench-model-")).resolve()
        _DOWNLOADED.add(target)
        try:
            location = self._artifact_location(resolved)
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(target), tracking_uri=self.tracking_uri,
                                                            registry_uri=self.registry_uri))
        except Exception as e:
            discard(target)
            raise ModelNotFound(f"cannot download {source} from {self.tracking_uri}: {_first_line(e)}") from None

    def _artifact_location(self, resolved: ResolvedModel) -> str:
        """Where a model's files are, found through this store's client. A `models:/` URI is never
        handed to MLflow's downloader: MLflow 3 resolves it against the process-wide registry URI
        (`./mlflow.db` when MLFLOW_TRACKING_URI is unset), ignoring the URIs it is given."""
        if resolved.version:
            assert resolved.name is not None  # Store.resolve sets a version only with the model's name
            return self.client.get_model_version_download_uri(resolved.name, resolved.version)
        logged = _LOGGED_MODEL_URI.match(resolved.uri)
        if logged:
            return self.client.get_logged_model(logged["model_id"]).artifact_location
        return resolved.uri

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


def discard(path: Path) -> None:
    """Remove the temporary folder this process's `Store.download` fetched `path` into; anything
    else (a local model folder it returned as it was, one `save_model` wrote) is left alone."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder in _DOWNLOADED:
            _DOWNLOADED.discard(folder)
            shutil.rmtree(folder, ignore_errors=True)
            return


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
