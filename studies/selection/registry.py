"""The MLflow Model Registry side of selection: versions, aliases, and their history."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from models.errors import WorkbenchError
from models.faults import retry_call

if TYPE_CHECKING:
    import keras

    from serving.store import Store

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "workbench.champion_history"  # comma-separated versions, oldest first
SERVING_COSTS_TAG = "workbench.serving_costs_confirmed"  # a run's serving costs as selecting measured them (JSON)


class RegistryError(WorkbenchError):
    """The registry refused an operation, or the run has no model to register."""


class _NotReady(Exception):
    """A new model version whose files are still being copied."""


class Registry:
    """Registered-model versions and aliases (MLflow 3 aliases, not stages)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = store.client
        self.tracking_uri = store.tracking_uri

    def has_model(self, run_id: str) -> bool:
        try:
            return any(a.path == "model/MLmodel" for a in self.client.list_artifacts(run_id, "model"))
        except Exception:
            return False

    def load_keras(self, run_id: str) -> keras.Model:
        """The run's network as a compiled Keras model (for evaluation), fetched by serving's loader."""
        import keras

        from models.contract import ModelContract
        from serving.store import discard

        path = self.store.download(self.store.resolve(f"runs:/{run_id}/model"))
        try:
            return keras.saving.load_model(ModelContract.network_file(path))
        finally:
            discard(path)

    def serving_costs(self, run_id: str) -> dict[str, float] | None:
        """The serving costs an earlier selection measured for this run's model, if any."""
        raw = self.client.get_run(run_id).data.tags.get(SERVING_COSTS_TAG)
        try:
            return {str(k): float(v) for k, v in json.loads(raw).items()} if raw else None
        except (ValueError, TypeError, AttributeError):  # a tag edited by hand: measured again
            return None

    def record_serving_costs(self, run_id: str, costs: dict[str, float]) -> None:
        """Keep what selecting measured on the run (tag workbench.serving_costs_confirmed)."""
        self.client.set_tag(run_id, SERVING_COSTS_TAG, json.dumps(costs, sort_keys=True))

    def version_for_run(self, name: str, run_id: str) -> Any | None:
        found = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        return min(found, key=lambda v: int(v.version)) if found else None

    def register(self, name: str, run_id: str, *, tags: dict[str, str], description: str) -> tuple[Any, bool]:
        """The version of this run, created if missing. Returns (version, created)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, description="Keras models selected from Optuna studies.")
            except MlflowException:
                pass  # created meanwhile by another selector
        existing = self.version_for_run(name, run_id)
        if existing is not None:
            return existing, False
        version = self.client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                                   tags=tags, description=description)

        def ready() -> Any:
            found = self.client.get_model_version(name, version.version)
            if found.status != "READY":
                raise _NotReady(found.status)
            return found

        # File and SQL stores are READY at once; a server copying artifacts may take a while.
        try:
            return retry_call(ready, f"waiting for {name} v{version.version}", attempts=60, delay=0.5, max_delay=0.5,
                              retry_if=lambda e: isinstance(e, _NotReady)), True
        except _NotReady:
            return self.client.get_model_version(name, version.version), True

    def by_alias(self, name: str, alias: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def history(self, name: str) -> list[str]:
        tags = self.client.get_registered_model(name).tags
        return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]

    def make_champion(self, name: str, version: str, *, reason: str) -> str | None:
        """Point `champion` at the version; remember the move. Returns the previous champion."""
        previous = self.by_alias(name, CHAMPION)
        previous_version = str(previous.version) if previous is not None else None
        self._set_alias(name, CHAMPION, version)
        self._record(name, version, previous_version, reason)
        history = self.history(name)
        if history[-1:] != [str(version)]:  # a second selector of the same winner adds nothing
            _upsert(self.client.set_registered_model_tag, name, HISTORY_TAG, ",".join([*history, str(version)]))
        challenger = self.by_alias(name, CHALLENGER)
        if challenger is not None and str(challenger.version) == str(version):
            self.client.delete_registered_model_alias(name, CHALLENGER)
        return previous_version

    def make_challenger(self, name: str, version: str, *, reason: str) -> None:
        self._set_alias(name, CHALLENGER, version)
        self._record(name, version, None, reason)

    def rollback(self, name: str) -> tuple[str, str]:
        """Move `champion` back to the champion before the current one. Returns (from, to)."""
        history = self.history(name)
        current = self.by_alias(name, CHAMPION)
        if current is None or len(history) < 2:
            raise RegistryError(f"registered model {name!r} has no previous champion to roll back to")
        target = history[-2]
        self._set_alias(name, CHAMPION, target)
        _upsert(self.client.set_registered_model_tag, name, HISTORY_TAG, ",".join(history[:-1]))
        self._record(name, target, str(current.version), f"rollback from version {current.version}")
        return str(current.version), target

    def _set_alias(self, name: str, alias: str, version: str) -> None:
        _upsert(self.client.set_registered_model_alias, name, alias, version)

    def _record(self, name: str, version: str, previous: str | None, reason: str) -> None:
        moves = json.loads(self.client.get_model_version(name, version).tags.get("workbench.alias_moves", "[]"))
        moves.append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason, "previous_champion": previous})
        _upsert(self.client.set_model_version_tag, name, version, "workbench.alias_moves", json.dumps(moves)[-4900:])
        if previous is not None:
            _upsert(self.client.set_model_version_tag, name, version, "workbench.previous_champion", str(previous))


def _upsert(setter: Any, *args: Any) -> None:
    """Set an alias or a tag. MLflow's SQL store inserts one it does not have; when another selector
    (a second process of the same study) inserted it in between, the insert fails on the key, and
    setting it again updates the row that is there now."""
    from mlflow.exceptions import MlflowException

    try:
        setter(*args)
    except MlflowException as e:
        if "already exists" not in str(e) and "UNIQUE constraint" not in str(e):
            raise
        setter(*args)
