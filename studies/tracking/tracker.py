"""MLflow tracking of a study: one parent run per study, one nested child run per trial.

The studies package talks to MLflow only through `studies.tracking` (the registry side of
selection goes through serving's store). To keep logging off the critical path, a trial costs
one synchronous request (creating its run); epoch metrics are buffered and sent in batches, and
the end of a trial (final metrics, tags, model upload, status) is sent from a background thread
(tracking.background) while the next trial trains.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from models.faults import describe
from studies.storage.study import WARM_START_ATTR, best_trial, state_counts, stopped_record
from studies.tracking.background import BackgroundLog
from studies.tracking.client import (
    TrackingError,
    check_http,
    experiment_id,
    git_commit,
    metrics_of,
    mlflow_client,
    retry_step,
    tags_of,
)
from studies.tracking.model_format import save_model
from studies.tracking.names import PARENT_ROLE, RUN_ID_ATTR, RUN_STATUS, STUDY_TAG

if TYPE_CHECKING:
    import keras
    import optuna

    from models import DataSpec
    from studies.config import LoadedConfig

_BATCH = 900  # below MLflow's 1000-metrics-per-log_batch limit


class Tracker:
    """Logs one study (this process's share of it) to MLflow."""

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_location: str | None,
                 log_models: str = "best", flush_seconds: float = 10.0, registry_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = mlflow_client(tracking_uri, registry_uri)
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
        self.log = BackgroundLog(self.client)

    # -- the study -----------------------------------------------------------------------
    def start_study(self, study: optuna.Study, loaded: LoadedConfig, *, data_hash: str, storage_url: str) -> str:
        """Check the server and the artifact store, then find or create the study's parent run."""
        if self.tracking_uri.startswith(("http://", "https://")):
            check_http(self.tracking_uri)
        self.experiment_id = retry_step(self._experiment_id, f"opening MLflow experiment {self.experiment_name!r}")
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
        lineage = study.user_attrs.get(WARM_START_ATTR)
        if isinstance(lineage, dict):  # where the study started from (studies.storage.warm_start)
            parent_tags |= {f"workbench.warm_start.{k}": str(v)[:5000] for k, v in lineage.items()}
        self.parent_run_id = retry_step(lambda: self._parent_run(study.study_name, parent_tags), "creating the study's parent run")
        # Writing the inputs checks the artifact store (S3) before any trial trains.
        retry_step(lambda: self._log_inputs(loaded), "uploading the config to the artifact store")
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
        self.client.log_batch(run_id, tags=tags_of(tags))
        return run_id

    def _log_inputs(self, loaded: LoadedConfig) -> None:
        self.client.log_artifact(self.parent_run_id, str(loaded.source), "inputs")
        self.client.log_artifact(self.parent_run_id, str(loaded.space_path), "inputs")
        self.client.log_dict(self.parent_run_id, loaded.config.model_dump(mode="json"), "inputs/resolved_config.json")

    def end_study(self, study: optuna.Study, *, report_html: str | None, status: str = "FINISHED") -> None:
        """Wait for this process's trial logging, then write the summary and reports to the parent run."""
        self.wait()
        counts = state_counts(study)
        summary: dict[str, Any] = {"study": study.study_name, "counts": dict(counts)}
        metrics = {f"n_{k.lower()}": float(v) for k, v in counts.items()}
        best = best_trial(study) if len(study.directions) == 1 else None
        if best is not None and best.value is not None:
            summary["best_trial"] = {"number": best.number, "value": best.value, "params": best.params,
                                     "mlflow_run_id": best.user_attrs.get(RUN_ID_ATTR)}
            metrics["best_value"] = float(best.value)
        elif counts["COMPLETE"] and len(study.directions) > 1:
            summary["pareto_front"] = [{"number": t.number, "values": t.values, "mlflow_run_id": t.user_attrs.get(RUN_ID_ATTR)}
                                       for t in study.best_trials]
        stopped = stopped_record(study)
        tags: dict[str, str] = {}
        if stopped is not None:
            summary["stopped"] = stopped
            tags = {"workbench.stop_reason": stopped["reason"][:5000]}
        run_id = self.parent_run_id

        def finish() -> None:
            self.client.log_dict(run_id, summary, "summary.json")
            if tags:
                self.client.log_batch(run_id, tags=tags_of(tags))
            if report_html is not None:
                self.client.log_text(run_id, report_html, "reports/study_report.html")
            self.client.log_batch(run_id, metrics=metrics_of(metrics, step=sum(counts.values())))
            self.client.set_terminated(run_id, status=status)

        try:
            retry_step(finish, "writing the study summary")
        except TrackingError as e:
            self.log.warn(str(e))

    # -- one trial -----------------------------------------------------------------------
    def start_trial(self, trial: optuna.Trial, params: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        """Create the trial's child run (the one synchronous request per trial); `tags` are the
        trial's own (seed, worker, retry lineage)."""
        tags = {**self.common_tags, "mlflow.parentRunId": self.parent_run_id, "optuna.trial_number": str(trial.number),
                "optuna.state": "RUNNING", **(tags or {})}
        try:
            run = retry_step(lambda: self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags),
                         f"creating the run of trial {trial.number}")
        except TrackingError as e:
            self.log.warn(str(e))
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
        metrics = metrics_of(logs, step=epoch)
        with self._lock:
            self._pending.setdefault(run_id, []).extend(metrics)
        if time.monotonic() - self._last_flush.get(run_id, 0.0) >= self.flush_seconds:
            self._last_flush[run_id] = time.monotonic()
            self.log.submit(run_id, lambda: self._flush(run_id), "logging epoch metrics")

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
            self._log_batched(run_id, metrics=[*pending, *metrics_of(metrics, step=0)], params=params, tags=end_tags)
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

        self.log.submit(run_id, finish, f"finishing the run of a {state} trial", on_error=fail, cleanup=model_dir)

    def _keep_model(self, is_best: bool) -> bool:
        return self.log_models == "all" or (self.log_models == "best" and is_best)

    # -- plumbing ------------------------------------------------------------------------
    def _flush(self, run_id: str) -> None:
        with self._lock:
            pending = self._pending.pop(run_id, [])
        params = self._params.pop(run_id, None)
        if pending or params:
            self._log_batched(run_id, metrics=pending, params=params)

    def _log_batched(self, run_id: str, *, metrics: Sequence[Any] = (), params: dict[str, Any] | None = None,
                     tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Param

        metrics = list(metrics)
        param_list = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        tag_list = tags_of(tags or {})
        first = True
        while first or metrics:
            chunk, metrics = metrics[:_BATCH], metrics[_BATCH:]
            self.client.log_batch(run_id, metrics=chunk, params=param_list if first else [], tags=tag_list if first else [])
            first = False

    @property
    def errors(self) -> list[str]:
        """Logging steps that failed for good (each also printed as a warning)."""
        return self.log.errors

    def wait(self) -> None:
        """Block until every queued logging step has run."""
        self.log.wait()

    def close(self) -> None:
        self.log.close()


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists become name_0, name_1, ... (the names Optuna uses)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, list):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat
