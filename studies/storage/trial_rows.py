"""A trial's rows written in few statements: the trial is checked once (it exists and may still
change), then one statement a table, its compiled form kept. Optuna's RDBStorage commits each
parameter and attribute apart (~0.8 ms a commit on SQLite here) and looks the trial up again for
each: every statement a round trip to a networked database.

Used inside a transaction of the workbench storage (studies.storage.rdb), on Optuna's own tables.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from typing import Any


def check_updatable(storage: Any, session: Any, trial_id: int) -> None:
    """Raise as Optuna does when the trial is gone or finished."""
    from optuna.storages._rdb import models

    trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
    storage.check_trial_is_updatable(trial_id, trial.state)


def upsert(session: Any, dialect: str, model: type, rows: list[dict[str, Any]], key: tuple[str, ...],
           update: tuple[str, ...]) -> bool:
    """Insert `rows` (one statement, its compiled form kept), those whose `key` columns exist
    already replacing the `update` columns. False where the database has no upsert (nothing written)."""
    statement = _upsert_statement(dialect, model, key, update)
    if statement is None:
        return False
    session.execute(statement, rows)
    return True


@functools.cache
def _upsert_statement(dialect: str, model: type, key: tuple[str, ...], update: tuple[str, ...]) -> Any:
    if dialect == "mysql":
        from sqlalchemy.dialects import mysql

        duplicate = mysql.insert(model)
        return duplicate.on_duplicate_key_update({c: getattr(duplicate.inserted, c) for c in update})
    if dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects import sqlite

        statement: Any = sqlite.insert(model)
    elif dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        statement = postgresql.insert(model)
    else:
        return None
    return statement.on_conflict_do_update(index_elements=[getattr(model, c) for c in key],
                                           set_={c: getattr(statement.excluded, c) for c in update})


def write_user_attrs(storage: Any, session: Any, trial_id: int, attrs: dict[str, Any]) -> None:
    from optuna.storages._rdb import models

    rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    if not upsert(session, storage.engine.name, models.TrialUserAttributeModel, rows, ("trial_id", "key"),
                  ("value_json",)):
        for key, value in attrs.items():
            storage._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)


def param_row(trial_id: int, name: str, value_internal: float, distribution: Any) -> dict[str, Any]:
    from optuna.distributions import distribution_to_json

    return {"trial_id": trial_id, "param_name": name, "param_value": value_internal,
            "distribution_json": distribution_to_json(distribution)}


def insert_params(session: Any, rows: list[dict[str, Any]]) -> None:
    """New parameters (a trial sets each once, as Optuna's own write assumes)."""
    import sqlalchemy
    from optuna.storages._rdb import models

    session.execute(sqlalchemy.insert(models.TrialParamModel), rows)


def write_intermediate_values(storage: Any, session: Any, trial_id: int, values: dict[int, float]) -> None:
    """The trial's values at these steps, in one statement."""
    from optuna.storages._rdb import models

    model = models.TrialIntermediateValueModel
    rows = []
    for step, value in values.items():
        stored, kind = model.intermediate_value_to_stored_repr(value)
        rows.append({"trial_id": trial_id, "step": step, "intermediate_value": stored, "intermediate_value_type": kind})
    if not upsert(session, storage.engine.name, model, rows, ("trial_id", "step"),
                  ("intermediate_value", "intermediate_value_type")):
        for step, value in values.items():
            storage._set_trial_intermediate_value_without_commit(session, trial_id, step, value)
