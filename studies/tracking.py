"""MLflow tracking: one parent run per study, one nested child run per trial.

This is the only module that talks to MLflow. To keep logging off the critical path, a trial
costs one synchronous request (creating its run); epoch metrics are buffered and sent in
batches, and the end of a trial (final metrics, tags, model upload, status) is sent from a
background thread while the next trial trains.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces.errors import WorkbenchError
from studies.faults import RetryLog, describe, retry_call

if TYPE_CHECKING:
    import keras
    import optuna

    from models import DataSpec
    from models.contract import ModelContract
    from studies.config import LoadedConfig

# Optuna state -> MLflow run status.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
PARENT_ROLE = "workbench.role"
STUDY_TAG = "optuna.study_name"
RUN_ID_ATTR = "mlflow_run_id"
# Requests to a tracking server fail fast instead of MLflow's default minutes of retrying;
# our own retry below bounds each logging step.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_BATCH = 900  # below MLflow's 1000-metrics-per-log_batch limit
RETRY_ATTEMPTS = 5  # with RETRY_DELAY 1 s: waits 1, 2, 4, 8 s, enough for a server or S3 restart
RETRY_DELAY = 1.0
# A run whose trial finished this long ago but is still RUNNING lost its worker mid-upload.
SETTLE_SECONDS = 300.0


class TrackingError(WorkbenchError):
    """The tracking server or its artifact store cannot be used."""


def _retry(action: Callable[[], Any], what: str, log: RetryLog | None = None) -> Any:
    """Run one logging step; transient errors (connection refused, 5xx, S3 unreachable) are
    retried RETRY_ATTEMPTS times in all with backoff, anything else fails at once."""
    try:
        return retry_call(action, what, attempts=RETRY_ATTEMPTS, delay=RETRY_DELAY, log=log)
    except Exception as e:
        raise TrackingError(f"{what} failed: {describe(e)}") from e


def git_commit(cwd: Path) -> str | None:
    """The checked-out commit, when the config lives in a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Tracker:
    """Logs one study (this process's share of it) to MLflow."""

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_location: str | None,
                 log_models: str = "best", flush_seconds: float = 10.0, registry_uri: str | None = None) -> None:
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        # Both URIs explicit: nothing falls back to MLflow's process-wide default (./mlflow.db).
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
        self.experiment_name = experiment
        self.artifact_location = artifact_location
        self.log_models = log_models
        self.flush_seconds = flush_seconds
        self.experiment_id = ""
        self.parent_run_id = ""
        self.common_tags: dict[str, str] = {}
        self._pending: dict[str, list[Any]] = {}
        self._params: dict[str, dict[str, Any]] = {}
        self._last_flush: dict[str, float] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-log")
        self._futures: list[Future] = []
        self.errors: list[str] = []

    # -- the study -----------------------------------------------------------------------
    def start_study(self, study: optuna.Study, loaded: LoadedConfig, *, data_hash: str, storage_url: str) -> str:
        """Check the server and the artifact store, then find or create the study's parent run."""
        if self.tracking_uri.startswith(("http://", "https://")):
            _check_http(self.tracking_uri)
        self.experiment_id = _retry(self._experiment_id, f"opening MLflow experiment {self.experiment_name!r}")
        cfg = loaded.config
        self.common_tags = {
            STUDY_TAG: study.study_name,
            "workbench.engine": cfg.engine,
            "workbench.sampler": cfg.sampler.type if cfg.engine == "optuna" else cfg.engine_label,
            "workbench.pruner": cfg.pruner.type if cfg.engine == "optuna" else "none",
            "workbench.space_hash": loaded.space.fingerprint(),
            "workbench.config_hash": loaded.config_hash,
            "workbench.data_hash": data_hash,
            "workbench.study_seed": str(cfg.study.seed),
        }
        commit = git_commit(loaded.source.resolve().parent)
        if commit:
            self.common_tags["mlflow.source.git.commit"] = commit
        parent_tags = {**self.common_tags, PARENT_ROLE: "study", "workbench.storage": storage_url,
                       "workbench.directions": ",".join(cfg.directions),
                       "workbench.metrics": ",".join(m.name for m in cfg.objective.specs())}
        self.parent_run_id = _retry(lambda: self._parent_run(study.study_name, parent_tags), "creating the study's parent run")
        # Writing the inputs checks the artifact store (S3) before any trial trains.
        _retry(lambda: self._log_inputs(loaded), "uploading the config to the artifact store")
        # MLflow maps installed packages to modules on the first model save (~1 s): do it now, in the
        # background, while the first trial trains.
        if self.log_models != "none":
            self._futures.append(self._executor.submit(_warm_requirement_checks))
        study.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        study.set_user_attr("mlflow_experiment_id", self.experiment_id)
        return self.parent_run_id

    def _experiment_id(self) -> str:
        return experiment_id(self.client, self.experiment_name, self.artifact_location)

    def _parent_runs(self, study_name: str) -> list[Any]:
        query = f"tags.`{PARENT_ROLE}` = 'study' AND tags.`{STUDY_TAG}` = '{study_name}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _parent_run(self, study_name: str, tags: dict[str, str]) -> str:
        runs = self._parent_runs(study_name)
        if not runs:
            self.client.create_run(self.experiment_id, run_name=study_name, tags=tags)
            # Two workers may both have created one: all agree on the oldest, the rest is removed.
            runs = self._parent_runs(study_name)
            for extra in runs[1:]:
                self.client.delete_run(extra.info.run_id)
        run_id = runs[0].info.run_id
        if runs[0].info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        self.client.log_batch(run_id, tags=_tags(tags))
        return run_id

    def _log_inputs(self, loaded: LoadedConfig) -> None:
        self.client.log_artifact(self.parent_run_id, str(loaded.source), "inputs")
        self.client.log_artifact(self.parent_run_id, str(loaded.space_path), "inputs")
        self.client.log_dict(self.parent_run_id, loaded.config.model_dump(mode="json"), "inputs/resolved_config.json")

    def end_study(self, study: optuna.Study, *, report_html: str | None, status: str = "FINISHED") -> None:
        """Wait for this process's trial logging, then write the summary and reports to the parent run."""
        self.wait()
        from studies.study import state_counts

        counts = state_counts(study)
        summary: dict[str, Any] = {"study": study.study_name, "counts": dict(counts)}
        metrics = {f"n_{k.lower()}": float(v) for k, v in counts.items()}
        if counts["COMPLETE"] and len(study.directions) == 1:
            best = study.best_trial
            summary["best_trial"] = {"number": best.number, "value": best.value, "params": best.params,
                                     "mlflow_run_id": best.user_attrs.get(RUN_ID_ATTR)}
            metrics["best_value"] = float(best.value)
        elif counts["COMPLETE"]:
            summary["pareto_front"] = [{"number": t.number, "values": t.values, "mlflow_run_id": t.user_attrs.get(RUN_ID_ATTR)}
                                       for t in study.best_trials]
        run_id = self.parent_run_id

        def finish() -> None:
            self.client.log_dict(run_id, summary, "summary.json")
            if report_html is not None:
                self.client.log_text(run_id, report_html, "reports/study_report.html")
            self.client.log_batch(run_id, metrics=_metrics(metrics, step=sum(counts.values())))
            self.client.set_terminated(run_id, status=status)

        try:
            _retry(finish, "writing the study summary")
        except TrackingError as e:
            self.errors.append(str(e))
            print(f"warning: {e}", file=sys.stderr)

    # -- runs left behind by dead workers ------------------------------------------------
    def close_stale_run(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A stale-trial callback: the trial's worker died (no heartbeat), so close its run."""
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            reason = f"worker lost: no heartbeat from {trial.user_attrs.get('worker', 'its worker')}, trial {trial.number} failed"
            self._submit(run_id, lambda: self._close(run_id, "FAIL", reason), "closing the run of a stale trial")

    def reconcile(self, study: optuna.Study) -> int:
        """Close child runs left RUNNING although their trial has finished (its worker died
        between the trial's end and its run's end): they become FAILED with the reason in the
        `workbench.fail_reason` tag. Runs whose trial still runs are left to the heartbeat."""
        query = f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' AND attributes.status = 'RUNNING'"
        runs = _retry(lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000),
                      "looking for runs left RUNNING")
        if not runs:
            return 0
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        now = time.time()
        closed = 0
        for run in runs:
            number = run.data.tags.get("optuna.trial_number")
            trial = trials.get(int(number)) if number and number.isdigit() else None
            if trial is None or not trial.state.is_finished():
                continue
            if trial.user_attrs.get(RUN_ID_ATTR) == run.info.run_id and trial.datetime_complete is not None \
                    and now - trial.datetime_complete.timestamp() < SETTLE_SECONDS:
                continue  # its worker may still be uploading the model
            reason = (f"worker stopped before closing this run; trial {trial.number} is {trial.state.name}"
                      + (f" ({trial.user_attrs['fail_reason']})" if trial.user_attrs.get("fail_reason") else ""))
            self._submit(run.info.run_id, functools.partial(self._close, run.info.run_id, trial.state.name, reason),
                         "closing a run left RUNNING")
            closed += 1
        return closed

    def _close(self, run_id: str, state: str, reason: str) -> None:
        self.client.log_batch(run_id, tags=_tags({"optuna.state": state, "workbench.fail_reason": reason[:4000],
                                                  "workbench.reconciled": "true"}))
        self.client.set_terminated(run_id, status="FAILED")

    # -- one trial -----------------------------------------------------------------------
    def start_trial(self, trial: optuna.Trial, params: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        """Create the trial's child run (the one synchronous request per trial); `tags` are the
        trial's own (seed, worker, retry lineage)."""
        tags = {**self.common_tags, "mlflow.parentRunId": self.parent_run_id, "optuna.trial_number": str(trial.number),
                "optuna.state": "RUNNING", **(tags or {})}
        try:
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags),
                         f"creating the run of trial {trial.number}")
        except TrackingError as e:
            self._warn(str(e))
            trial.set_user_attr("mlflow_error", str(e))
            return None
        run_id = run.info.run_id
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        # Params travel with the first batch of epoch metrics (or the trial's end): no request of their own.
        self._params[run_id] = flatten_params(params)
        self._last_flush[run_id] = time.monotonic()
        return run_id

    def log_epoch(self, run_id: str | None, epoch: int, logs: dict[str, float]) -> None:
        """Buffer one epoch's metrics (step = epoch); send them every flush_seconds."""
        if run_id is None:
            return
        metrics = _metrics(logs, step=epoch)
        with self._lock:
            self._pending.setdefault(run_id, []).extend(metrics)
        if time.monotonic() - self._last_flush.get(run_id, 0.0) >= self.flush_seconds:
            self._last_flush[run_id] = time.monotonic()
            self._submit(run_id, lambda: self._flush(run_id), "logging epoch metrics")

    def end_trial(self, run_id: str | None, *, state: str, metrics: dict[str, float], tags: dict[str, str],
                  model: keras.Model | None = None, spec: DataSpec | None = None, is_best: bool = False) -> None:
        """Record how the trial ended; its model is saved now and uploaded in the background."""
        if run_id is None:
            return
        model_dir = None
        if model is not None and spec is not None and state == "COMPLETE" and self._keep_model(is_best):
            try:
                model_dir = save_model(model, spec, tags)
            except Exception as e:
                tags = {**tags, "workbench.model_error": describe(e)}
        end_tags = {**tags, "optuna.state": state}
        if state == "PRUNED":
            end_tags["pruned"] = "true"

        if model_dir is not None:
            end_tags["workbench.model"] = "model"

        def finish() -> None:
            with self._lock:
                pending = self._pending.pop(run_id, [])
            params = self._params.pop(run_id, None)
            self._log_batched(run_id, metrics=[*pending, *_metrics(metrics, step=0)], params=params, tags=end_tags)
            if model_dir is not None:
                self.client.log_artifacts(run_id, str(model_dir), "model")
            self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))

        def fail(reason: str) -> None:
            # Logging failed for good: the Optuna trial is recorded anyway; mark the run failed.
            try:
                self.client.set_tag(run_id, "workbench.tracking_error", reason[:4000])
                self.client.set_terminated(run_id, status="FAILED")
            except Exception:
                pass

        self._submit(run_id, finish, f"finishing the run of a {state} trial", on_error=fail, cleanup=model_dir)

    def _keep_model(self, is_best: bool) -> bool:
        return self.log_models == "all" or (self.log_models == "best" and is_best)

    # -- plumbing ------------------------------------------------------------------------
    def _flush(self, run_id: str) -> None:
        with self._lock:
            pending = self._pending.pop(run_id, [])
        params = self._params.pop(run_id, None)
        if pending or params:
            self._log_batched(run_id, metrics=pending, params=params)

    def _log_batched(self, run_id: str, *, metrics: list[Any] = (), params: dict[str, Any] | None = None,
                     tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Param

        metrics = list(metrics)
        param_list = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        tag_list = _tags(tags or {})
        first = True
        while first or metrics:
            chunk, metrics = metrics[:_BATCH], metrics[_BATCH:]
            self.client.log_batch(run_id, metrics=chunk, params=param_list if first else [], tags=tag_list if first else [])
            first = False

    def _submit(self, run_id: str, action: Callable[[], None], what: str, *,
                on_error: Callable[[str], None] | None = None, cleanup: Path | None = None) -> None:
        def task() -> None:
            log = RetryLog()
            try:
                _retry(action, f"{what} (run {run_id})", log)
                if log.entries:  # it got through in the end: say what it took
                    self.client.set_tag(run_id, "workbench.retries", "; ".join(log.entries)[:8000])
            except TrackingError as e:
                self._warn(str(e))
                if on_error is not None:
                    on_error("; ".join([*log.entries, str(e)]))
            except Exception as e:  # the retries tag itself: never worth failing the trial over
                self._warn(f"{what} (run {run_id}): {describe(e)}")
            finally:
                if cleanup is not None:
                    import shutil

                    shutil.rmtree(cleanup.parent, ignore_errors=True)

        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self._executor.submit(task))

    def _warn(self, message: str) -> None:
        self.errors.append(message)
        print(f"warning: {message}", file=sys.stderr)

    def wait(self) -> None:
        """Block until every queued logging step has run."""
        for future in list(self._futures):
            future.result()
        self._futures.clear()

    def close(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)


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


def log_comparison(tracking_uri: str, experiment: str, *, title: str, html_page: str, studies: list[str],
                   rows: list[dict[str, Any]], artifact_location: str | None) -> str:
    """One finished run in `experiment` holding a comparison of studies: the page
    (reports/compare.html), its table (reports/compare.json), each study's best value and time
    to the common best as metrics. Returns the run id."""
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    if tracking_uri.startswith(("http://", "https://")):
        _check_http(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = _retry(lambda: experiment_id(client, experiment, artifact_location), f"opening MLflow experiment {experiment!r}")
    tags = {PARENT_ROLE: "comparison", "workbench.studies": ",".join(studies), "mlflow.note.content": title}
    run = _retry(lambda: client.create_run(exp, run_name="compare " + " vs ".join(studies), tags=tags), "creating the comparison run")
    run_id = run.info.run_id
    values: dict[str, float] = {}
    for row in rows:
        key = re.sub(r"[^\w\-. /]", "_", row["study"])  # the characters MLflow allows in a metric name
        values[f"best.{key}"] = row["best"]
        if row.get("seconds_to_common_best") is not None:
            values[f"seconds_to_common_best.{key}"] = row["seconds_to_common_best"]

    def write() -> None:
        client.log_text(run_id, html_page, "reports/compare.html")
        client.log_dict(run_id, rows, "reports/compare.json")
        client.log_batch(run_id, metrics=_metrics(values, step=0))
        client.set_terminated(run_id, status="FINISHED")

    _retry(write, "logging the comparison")
    return run_id


def _check_http(uri: str) -> None:
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


def _metrics(values: dict[str, float], *, step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if _finite(v)]


def _tags(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)[:8000]) for k, v in tags.items() if v is not None]


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists become name_0, name_1, ... (the names Optuna uses)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, list):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


@functools.cache
def pip_requirements() -> tuple[str, ...]:
    """Pinned requirements of a logged model, given explicitly (inferring them costs ~12 s a model)."""
    from importlib import metadata

    reqs = []
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return tuple(reqs)


def _warm_requirement_checks() -> None:
    from mlflow.utils import requirements_utils

    pip_requirements()
    requirements_utils._init_packages_to_modules_map()


def save_model(model: keras.Model, spec: DataSpec, tags: dict[str, str]) -> Path:
    """Save the Keras model as an MLflow model carrying its contract (models.contract) into a temp dir:
    the Keras flavor for all-numeric data, a pyfunc taking raw records for a mixed-type table."""
    import mlflow.keras
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from models.contract import ModelContract

    contract = ModelContract.from_spec(spec)
    metadata = contract.metadata(study=tags.get(STUDY_TAG), trial_number=tags.get("optuna.trial_number"))
    path = Path(tempfile.mkdtemp(prefix="workbench-model-")) / "model"
    if contract.table is not None:
        return _save_table_model(model, contract, metadata, path)
    outputs = 1 if spec.task != "multiclass" else spec.n_classes
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, spec.n_features), "features")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, outputs))]),
    )
    mlflow.keras.save_model(model, str(path), signature=signature, pip_requirements=list(pip_requirements()), metadata=metadata)
    return path


def _save_table_model(model: keras.Model, contract: ModelContract, metadata: dict[str, Any], path: Path) -> Path:
    """A mixed-type table's model: an MLflow pyfunc (serving.pyfunc.TableModel) holding the network
    and its encoding, with the raw columns as its signature."""
    import mlflow.pyfunc
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    from serving.pyfunc import TableModel

    parts = path.parent / "parts"
    parts.mkdir()
    model.save(parts / "model.keras")
    table = contract.write_table(parts)
    signature = ModelSignature(inputs=Schema([ColSpec(AnyType() if c.raw_type == "any" else c.raw_type, c.name, required=False)
                                              for c in contract.table.columns]))
    mlflow.pyfunc.save_model(str(path), python_model=TableModel(), signature=signature, metadata=metadata,
                             artifacts={"keras_model": str(parts / "model.keras"), "table": str(table)},
                             pip_requirements=list(pip_requirements()))
    return path
