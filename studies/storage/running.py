"""The trials this process is running, read from memory: its own writes kept on a copy, and
their intermediate values written with the trial's next write instead of one transaction each.

Optuna's trial cache (optuna.storages._cached_storage) keeps finished trials only: every read of
the study (the sampler's, the pruner's, the trial budget's) and every look at the running trial
itself (`Trial()`, the pruner's rung attributes, `tell`) loads the running trial again from the
database, with its parameters, attributes and intermediate values: ~2 ms each on SQLite, nine
times a trial (a 40-second churn study: 3.3 s of its trials' time). Only this process changes a
trial it started, so the storage keeps a copy of each, as Optuna created it (on SQLite and
PostgreSQL; elsewhere, and for a trial taken from the queue, read once from the database as it
starts) and then changed by each write it passes on (after the write, in the form a read would
give back), and answers reads of it from the copy; the database query leaves it out. A trial
leaves the copies before the write that finishes it (a retried finishing write reads the
database).

Each epoch's report was a transaction of its own (~1.4 ms on SQLite, six a trial), and so was
each system attribute (TPE's relative parameters as the trial starts, successive halving's rung
at each one it reaches: ~1.4 ms each, 2.4 a trial). Now a running trial's intermediate values
and system attributes reach the database with its next other write (the trial's user
attributes, its end; in the same transaction), and at the latest with the first report or system
attribute a second or more after the last write (FLUSH_SECONDS; the CURVE_SECONDS setting,
studies.environment): another process (the dashboard, a worker) sees a running trial's curve and
rungs that late, and every finished trial's whole. No pruner reads another trial's curve before
it finishes (median, percentile, Wilcoxon: finished trials). Successive halving and Hyperband
compare a trial at a rung with the trials that reached it, running ones too: another worker's
rung may count a second late, as asynchronous successive halving allows (its promotions never
wait for the rung to fill). A worker killed mid-trial loses at most that second of its curve
and rungs, of a trial that is failed and run again anyway.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from typing import TYPE_CHECKING, Any

from studies.storage import trial_rows

if TYPE_CHECKING:
    from collections.abc import Callable

    from optuna.trial import FrozenTrial

FLUSH_SECONDS = 1.0
# Databases whose timestamps keep microseconds: a new trial's start reads back as Optuna set it
# (MySQL's DATETIME drops them), so a trial created empty is kept without reading it back.
EXACT_DATETIMES = ("sqlite", "postgresql")


class _Own:
    """This storage's running trials: their copies, the intermediate values not yet written."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.trials: dict[int, tuple[int, FrozenTrial]] = {}  # trial id -> (study id, copy)
        self.held: dict[int, dict[int, float]] = {}  # trial id -> {step: value}
        self.held_attrs: dict[int, dict[str, Any]] = {}  # trial id -> {system attribute: value}
        self.written: dict[int, float] = {}  # trial id -> when its rows were last written


class RunningTrials:
    """Mixed into the workbench's RDBStorage (studies.storage.rdb), before the retried methods."""

    curve_seconds: float | None = None  # set by open_storage; None: FLUSH_SECONDS

    if TYPE_CHECKING:  # given by the storage it is mixed into
        scoped_session: Any

        def _call(self, name: str, call: Callable[[], Any]) -> Any: ...

        def _write(self, name: str, write: Callable[[Any], None]) -> None: ...

        def _build_frozen_trial_from_trial_model(self, model: Any) -> FrozenTrial: ...

        def _set_trial_attr_without_commit(self, session: Any, model: Any, trial_id: int, key: str, value: Any) -> None: ...

        def _holding(self, trial_id: int) -> Any: ...

        engine: Any

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(super().__getstate__())  # type: ignore[call-overload]
        state.pop("_own_trials", None)  # a lock; copies of a process's own trials
        return state

    def _own(self) -> _Own:
        own = self.__dict__.get("_own_trials")
        if own is None:
            own = self.__dict__.setdefault("_own_trials", _Own())
        return own

    def _start(self, trial_id: int) -> None:
        """Keep a copy of the trial, as the database holds it now."""
        self._keep(*self._call("get_trial", lambda: self._read_with_study(trial_id)))

    def _keep(self, study_id: int, trial: FrozenTrial) -> None:
        own = self._own()
        with own.lock:
            own.trials[trial._trial_id] = (study_id, trial)
            own.written[trial._trial_id] = time.monotonic()

    def _read_with_study(self, trial_id: int) -> tuple[int, FrozenTrial]:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            model = models.TrialModel.find_or_raise_by_id(trial_id, session)
            return int(model.study_id), self._build_frozen_trial_from_trial_model(model)

    def _edit(self, trial_id: int, change: Callable[[FrozenTrial], None]) -> None:
        own = self._own()
        with own.lock:
            if trial_id in own.trials:
                change(own.trials[trial_id][1])

    def _take_held(self, trial_id: int) -> tuple[dict[int, float], dict[str, Any]]:
        own = self._own()
        with own.lock:
            if trial_id in own.written:
                own.written[trial_id] = time.monotonic()
            return own.held.pop(trial_id, {}), own.held_attrs.pop(trial_id, {})

    def _with_held(self, trial_id: int, name: str, write: Callable[[Any], None] | None) -> bool:
        """Write the trial's held intermediate values and system attributes, then
        `write(session)`, in one transaction; False (nothing written) when none are held."""
        from optuna.storages._rdb import models

        held, attrs = self._take_held(trial_id)
        if not held and not attrs:
            return False

        def all_of_them(session: Any) -> None:
            trial_rows.check_updatable(self, session, trial_id)
            if held:
                trial_rows.write_intermediate_values(self, session, trial_id, held)
            for key, value in attrs.items():
                self._set_trial_attr_without_commit(session, models.TrialSystemAttributeModel, trial_id, key, value)
            if write is not None:
                write(session)

        try:
            self._write(name, all_of_them)
        except BaseException:
            own = self._own()
            with own.lock:  # still held: a later write may land them
                own.held[trial_id] = {**held, **own.held.get(trial_id, {})}
                own.held_attrs[trial_id] = {**attrs, **own.held_attrs.get(trial_id, {})}
            raise
        return True

    # -- reads ------------------------------------------------------------------------------
    def get_trial(self, trial_id: int) -> FrozenTrial:
        own = self._own()
        with own.lock:
            if trial_id in own.trials:
                return copy.deepcopy(own.trials[trial_id][1])
        return super().get_trial(trial_id)  # type: ignore[misc]

    def _get_trials(self, study_id: int, states: Any, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        own = self._own()
        with own.lock:
            mine = {i: copy.deepcopy(t) for i, (s, t) in own.trials.items() if s == study_id}
        if not mine:
            return super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)  # type: ignore[misc]
        read = self._call("_get_trials", lambda: self._trials_except(study_id, states, included_trial_ids,
                                                                      trial_id_greater_than, set(mine)))
        kept = [t for i, t in mine.items() if (states is None or t.state in states)
                and (i in included_trial_ids or i > trial_id_greater_than)]
        return sorted([*read, *kept], key=lambda t: t._trial_id)

    def _trials_except(self, study_id: int, states: Any, included: set[int], greater_than: int,
                       excluded: set[int]) -> list[FrozenTrial]:
        """Optuna's RDBStorage._get_trials, leaving out the `excluded` trials."""
        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import orm

        trial = models.TrialModel
        included = {i for i in included if i <= greater_than and i not in excluded}
        newer = trial.trial_id > greater_than
        with _create_scoped_session(self.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session)
            query = (
                session.query(trial)
                .options(*(orm.selectinload(getattr(trial, r))
                           for r in ("params", "values", "user_attributes", "system_attributes", "intermediate_values")))
                .filter(trial.study_id == study_id, trial.trial_id.notin_(excluded),
                        sqlalchemy.or_(trial.trial_id.in_(included), newer) if included else newer)
            )
            if states is not None:
                query = query.filter(trial.state.in_(list(states)))
            return [self._build_frozen_trial_from_trial_model(t) for t in query.order_by(trial.trial_id).all()]

    # -- writes: passed on (with the held values), then kept on the copy ----------------------
    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        from optuna.trial import TrialState

        created = super()._create_new_trial(study_id, template_trial)  # type: ignore[misc]
        if created.state == TrialState.RUNNING:
            if template_trial is None and self.engine.dialect.name in EXACT_DATETIMES:
                self._keep(study_id, copy.deepcopy(created))  # what a read would give back: nothing but its start
            else:
                self._start(created._trial_id)
        return created

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        from optuna.trial import TrialState

        if state != TrialState.RUNNING:
            try:
                self._with_held(trial_id, "set_trial_intermediate_values", None)  # the whole curve first
            finally:
                own = self._own()
                with own.lock:
                    own.trials.pop(trial_id, None)
                    own.held.pop(trial_id, None)
                    own.held_attrs.pop(trial_id, None)
                    own.written.pop(trial_id, None)
        moved = super().set_trial_state_values(trial_id, state, values)  # type: ignore[misc]
        if moved and state == TrialState.RUNNING:  # a queued trial this process took
            self._start(trial_id)
        return moved

    def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any,
                         previous_distribution: Any) -> None:
        from optuna.distributions import distribution_to_json, json_to_distribution

        super()._set_trial_param(trial_id, param_name, param_value_internal, distribution,  # type: ignore[misc]
                                 previous_distribution)
        stored = json_to_distribution(distribution_to_json(distribution))

        def change(t: FrozenTrial) -> None:
            t.params[param_name] = stored.to_external_repr(param_value_internal)
            t.distributions[param_name] = stored

        self._edit(trial_id, change)

    def _hold(self, trial_id: int, name: str, hold: Callable[[_Own, FrozenTrial], None]) -> bool:
        """`hold(own, copy)` a write to one of this process's running trials (held, and on its
        copy), written at once with what else it holds when a second (curve_seconds) has passed
        since its last write; False when the trial is not one of them."""
        own = self._own()
        with own.lock:
            if trial_id not in own.trials:
                return False
            hold(own, own.trials[trial_id][1])
            seconds = FLUSH_SECONDS if self.curve_seconds is None else self.curve_seconds
            due = time.monotonic() - own.written.get(trial_id, 0.0) >= seconds
        if due:
            self._with_held(trial_id, name, None)
        return True

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        def hold(own: _Own, trial: FrozenTrial) -> None:
            own.held.setdefault(trial_id, {})[step] = trial.intermediate_values[step] = float(intermediate_value)

        if not self._hold(trial_id, "set_trial_intermediate_values", hold):
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)  # type: ignore[misc]

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.set_trial_user_attrs(trial_id, {key: value})

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        attrs = dict(attrs)
        if self._holding(trial_id) is not None:  # inside one_transaction: with the block's write (_write_block)
            super().set_trial_user_attrs(trial_id, attrs)  # type: ignore[misc]
        elif not self._with_held(trial_id, "set_trial_user_attrs",
                                 lambda session: trial_rows.write_user_attrs(self, session, trial_id, attrs)):
            super().set_trial_user_attrs(trial_id, attrs)  # type: ignore[misc]
        self._edit(trial_id, lambda t: t.user_attrs.update({k: _stored(v) for k, v in attrs.items()}))

    def _write_block(self, held: Any) -> None:
        """studies.storage.rdb's one_transaction block, with what the trial holds here."""
        if not self._with_held(held.trial_id, "one_transaction", held.rows):  # _with_held checks the trial's state
            super()._write_block(held)  # type: ignore[misc]

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        def hold(own: _Own, trial: FrozenTrial) -> None:
            own.held_attrs.setdefault(trial_id, {})[key] = value
            trial.system_attrs[key] = _stored(value)

        if not self._hold(trial_id, "set_trial_system_attr", hold):
            super().set_trial_system_attr(trial_id, key, value)  # type: ignore[misc]


def _stored(value: Any) -> Any:
    """An attribute's value as the database gives it back (JSON)."""
    return json.loads(json.dumps(value))
