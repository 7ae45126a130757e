"""`engine: keras_tuner`: a KerasTuner tuner walks the study's YAML search space.

Each KerasTuner trial is also a trial of the Optuna study in the study's storage and a nested
MLflow run, exactly as with the Optuna engine: when KerasTuner starts a trial, its values become
a RUNNING Optuna trial with the space's own distributions; the workbench's Objective builds and
seeds the model, trains it (KerasTuner's checkpoint callback rides along), reports every epoch
(intermediate values, MLflow metrics) and scores it; the trial ends COMPLETE with the objective's
value, or FAIL with its reason. A Hyperband trial that continues an earlier one starts from its
checkpoint and reports epochs `initial_epoch`..`epochs - 1` (user attrs `kt_*` say which).

The budget is the workbench's: `n_trials` finished trials in the study, `timeout`, `max_failed`;
KerasTuner's own project folder (its oracle state and checkpoints) lives in the project data
folder, so the same command resumes both.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras_tuner
import optuna
from optuna.trial import TrialState

from models.faults import describe
from search_spaces import compile_space, params_from_values, to_hyperparameters
from studies.engines.objective import Objective
from studies.engines.workers import interruption_reason, raise_if_signalled, signals_deferred
from studies.reporting.progress import Progress
from studies.storage.study import BUDGET_STATES, sampler_seed, state_counts
from studies.tracking import flatten_params

if TYPE_CHECKING:
    from studies.engines.session import Session
    from studies.tracking import TrialTracker

TUNERS: dict[str, type] = {
    "random": keras_tuner.RandomSearch,
    "bayesian": keras_tuner.BayesianOptimization,
    "hyperband": keras_tuner.Hyperband,
}
# Hyperband's bookkeeping values on a trial, recorded as user attributes (not search parameters).
_TUNER_KEYS = {"tuner/epochs": "kt_epochs", "tuner/initial_epoch": "kt_initial_epoch", "tuner/bracket": "kt_bracket",
               "tuner/round": "kt_round", "tuner/trial_id": "kt_continues"}


class _BudgetSpent(Exception):
    """Raised before KerasTuner creates a trial: the workbench's budget says stop."""


def project_dir(home: Path, study_name: str, storage_url: str) -> Path:
    """KerasTuner's project folder for a study in one storage (two storages never share one)."""
    digest = hashlib.sha256(storage_url.encode()).hexdigest()[:8]
    return home / "keras_tuner" / f"{study_name}-{digest}"


@dataclass
class _Live:
    """The KerasTuner trial running now, and its Optuna twin."""

    trial: optuna.Trial
    params: dict[str, Any]
    attrs: dict[str, Any]
    values: Any = None
    trained: bool = False  # the Objective ran (it records its own fail_reason)
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class Engine:
    """Drives one KerasTuner search for a study; the tuner calls back into it."""

    def __init__(self, session: Session, objective: Objective, progress: Progress) -> None:
        self.session = session
        self.objective = objective
        self.progress = progress
        self.space = session.loaded.space
        self.distributions = compile_space(self.space)
        cfg = session.loaded.config
        self.metric = cfg.objective.specs()[0]
        self.started = time.monotonic()
        self.timeout = cfg.budget.timeout
        self.max_failed = cfg.budget.failure_limit
        self.live: _Live | None = None
        self.stopped_on_failures = False

    # -- called by the tuner ---------------------------------------------------------------
    def before_trial(self) -> None:
        counts = state_counts(self.session.study)
        if sum(counts[s] for s in BUDGET_STATES) >= self.session.target:
            raise _BudgetSpent("n_trials")
        if self.timeout is not None and time.monotonic() - self.started >= self.timeout:
            raise _BudgetSpent("timeout")
        if self.progress.failed_here >= self.max_failed:
            self.stopped_on_failures = True
            raise _BudgetSpent("max_failed")

    def begin(self, kt_trial: Any) -> None:
        """A RUNNING Optuna trial holding the KerasTuner trial's values and the space's distributions."""
        from optuna.storages._heartbeat import get_heartbeat_thread

        raise_if_signalled()  # a signal that waited for TensorFlow (KerasTuner's own steps) stops before a new trial

        values = kt_trial.hyperparameters.values
        params = params_from_values(self.space, values)
        flat = flatten_params(params)
        attrs: dict[str, Any] = {"engine": "keras_tuner", "kt_trial_id": kt_trial.trial_id}
        attrs |= {ours: values[theirs] for theirs, ours in _TUNER_KEYS.items() if theirs in values}
        study = self.session.study
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING, params={k: v for k, v in flat.items() if k in self.distributions},
            distributions={k: self.distributions[k] for k in flat if k in self.distributions},
        )
        with signals_deferred():  # a trial created but unknown here would stay RUNNING
            trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
            trial = optuna.Trial(study, trial_id)
        self.live = _Live(trial, params, attrs)
        # optuna's private BaseHeartbeatThread types __exit__ for Exception only, not BaseException
        self.live.exits.enter_context(get_heartbeat_thread(trial_id, study._storage))  # type: ignore[arg-type]

    def build(self, hp: Any) -> Any:
        if self.live is None:
            raise RuntimeError("KerasTuner asked for a model outside a trial")
        return self.objective.build(self.live.params, self.objective.seed(self.live.trial))

    def fit(self, model: Any, *, callbacks: Any = (), epochs: int | None = None, initial_epoch: int = 0) -> dict[str, float]:
        live = self.live
        assert live is not None
        live.trained = True
        options: dict[str, Any] = {"callbacks": list(callbacks or ()), "initial_epoch": int(initial_epoch or 0)}
        if epochs is not None:
            options["epochs"] = int(epochs)
        live.values = self.objective.run(live.trial, model=model, fit_options=options, attrs=live.attrs)
        return {self.metric.name: float(live.values)}

    def end(self, kt_trial: Any) -> None:
        """Tell Optuna how the trial ended (KerasTuner's status decides COMPLETE or FAIL)."""
        live, self.live = self.live, None
        if live is None:
            return
        study = self.session.study
        try:
            with signals_deferred():
                if live.values is not None and kt_trial.status == keras_tuner.engine.trial.TrialStatus.COMPLETED:
                    frozen = study.tell(live.trial, live.values)
                else:
                    if not live.trained:  # KerasTuner failed before training (loading a checkpoint, building)
                        reason = (kt_trial.message or "KerasTuner failed the trial").strip().splitlines()[-1]
                        study._storage.set_trial_user_attr(live.trial._trial_id, "fail_reason", reason[:1000])
                    frozen = study.tell(live.trial, state=TrialState.FAIL)
        finally:
            live.exits.close()
        self.progress(study, frozen)

    def abandon(self, reason: str) -> None:
        """The search stopped inside a trial (interrupted): record it as FAIL."""
        live, self.live = self.live, None
        if live is None:
            return
        try:
            if not live.trained:  # stopped before training began: the Objective recorded nothing
                self.session.study._storage.set_trial_user_attr(live.trial._trial_id, "fail_reason", reason)
            self.session.study.tell(live.trial, state=TrialState.FAIL)
        except Exception as e:
            print(f"warning: could not record trial {live.trial.number} as FAIL ({reason}): {e}", file=sys.stderr)
        finally:
            live.exits.close()


class _HyperModel(keras_tuner.HyperModel):
    def __init__(self, engine: Engine) -> None:
        super().__init__(name="workbench")
        self.engine = engine

    def build(self, hp: Any) -> Any:
        return self.engine.build(hp)

    def fit(self, hp: Any, model: Any, *args: Any, callbacks: Any = (), epochs: int | None = None,
            initial_epoch: int = 0, **kwargs: Any) -> dict[str, float]:
        return self.engine.fit(model, callbacks=callbacks, epochs=epochs, initial_epoch=initial_epoch)


def _tuner_class(base: type) -> type:
    class WorkbenchTuner(base):
        def __init__(self, *args: Any, engine: Engine, **kwargs: Any) -> None:
            self.engine = engine
            super().__init__(*args, **kwargs)

        def _populate_initial_space(self) -> None:
            """Nothing to discover: the space is declared in full (conditions included) up front."""

        def pre_create_trial(self) -> None:
            self.engine.before_trial()

        def on_trial_begin(self, trial: Any) -> None:
            super().on_trial_begin(trial)
            self.engine.begin(trial)

        def on_trial_end(self, trial: Any) -> None:
            self.engine.end(trial)
            with signals_deferred():  # KerasTuner writes its oracle state here
                super().on_trial_end(trial)

    WorkbenchTuner.__name__ = f"Workbench{base.__name__}"
    return WorkbenchTuner


def make_tuner(session: Session, engine: Engine, directory: Path) -> Any:
    """The configured KerasTuner tuner on the compiled space, in `directory` (resumed if it exists)."""
    cfg = session.loaded.config
    settings = cfg.tuner
    spec = cfg.objective.specs()[0]
    n_trials = len(session.study.get_trials(deepcopy=False))
    seed = sampler_seed(cfg.study.seed, n_trials, None)
    if n_trials == 0 and directory.exists():  # a new study: an old project folder of that name is stale
        shutil.rmtree(directory)
    options: dict[str, Any] = dict(settings.resolved_options())
    if settings.tuner == "hyperband":
        options["max_epochs"] = cfg.training.epochs
    else:
        options["max_trials"] = cfg.budget.n_trials + engine.max_failed
    if settings.tuner == "bayesian" and options.get("num_initial_points") is None:
        options.pop("num_initial_points")
    return _tuner_class(TUNERS[settings.tuner])(
        engine=engine,
        hypermodel=_HyperModel(engine),
        objective=keras_tuner.Objective(spec.name, direction="min" if spec.resolved_direction() == "minimize" else "max"),
        hyperparameters=to_hyperparameters(session.loaded.space),
        tune_new_entries=False,
        allow_new_entries=False,
        seed=seed,
        # Failures are the workbench's to count (budget.max_failed); a failed trial is not re-run.
        max_retries_per_trial=0,
        max_consecutive_failed_trials=10**9,
        directory=str(directory.parent),
        project_name=directory.name,
        overwrite=False,
        **options,
    )


def run_keras_tuner(session: Session, tracker: TrialTracker | None, *, label: str | None = None) -> bool:
    """This process's KerasTuner search on the session's study until the budget is spent.
    Returns whether it stopped on failures (budget.max_failed)."""
    from studies.storage import redact

    directory = project_dir(session.settings.workbench_home.resolve(), session.study.study_name, redact(session.url))
    session.study.set_user_attr("keras_tuner_project", str(directory))
    objective = Objective(session.loaded, session.data, tracker, storage=session.storage, max_retries=0)
    progress = Progress(session.study, session.target, session.names, label=label)
    engine = Engine(session, objective, progress)
    tuner = make_tuner(session, engine, directory)
    try:
        tuner.search(verbose=0)
    except _BudgetSpent:
        pass
    except BaseException as e:  # interrupted (SIGINT/SIGTERM): the running trial is recorded as FAIL
        if isinstance(e, KeyboardInterrupt):
            engine.abandon(interruption_reason(e))
        else:
            engine.abandon(describe(e)[:1000])
        raise
    finally:
        progress.close()
    if engine.stopped_on_failures:
        print(f"error: stopped after {progress.failed_here} failed trials (budget.max_failed); see fail_reason above",
              file=sys.stderr)
        return True
    return False
