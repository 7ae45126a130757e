"""Fault handling without services: what is transient, bounded retries, re-queued trials,
SIGTERM, worker command lines and seeds. The same faults against the real services are in
tests/integration/test_faults.py."""

from __future__ import annotations

import os
import signal
import threading

import optuna
import pytest
import sqlalchemy.exc
from mlflow import MlflowClient

from models.faults import RetryLog, is_transient, retry_call
from studies.engines.workers import worker_argv
from studies.run import main as run_main
from studies.storage.study import derive_seed, sampler_seed
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("slow"), True),
        (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")), True),
        (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception('database "x" does not exist')), False),
        (ValueError("objective value is not finite: (nan,)"), False),
        (KeyError("units"), False),
    ],
)
def test_what_is_transient(exc, expected):
    assert is_transient(exc) is expected


def test_a_wrapped_connection_error_is_transient():
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise optuna.exceptions.StorageInternalError("commit failed") from inner
    except optuna.exceptions.StorageInternalError as e:
        assert is_transient(e)


def test_retry_call_is_bounded_and_logged():
    calls, log = [], RetryLog()

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert retry_call(flaky, "step", attempts=5, delay=0, log=log) == "ok"
    assert log.entries == ["step: attempt 1 failed (ConnectionError: down)", "step: attempt 2 failed (ConnectionError: down)"]
    calls.clear()
    with pytest.raises(ConnectionError):
        retry_call(lambda: flaky() and (_ for _ in ()).throw(ConnectionError("still down")), "step", attempts=2, delay=0)
    with pytest.raises(ValueError):  # deterministic: one call only
        retry_call(lambda: calls.append(1) or (_ for _ in ()).throw(ValueError("bad")), "step", attempts=5, delay=0)


def test_worker_command_line_drops_workers_and_adds_the_index():
    argv = ["cfg.yaml", "--workers", "3", "--n-trials", "9", "--workers=3"]
    assert worker_argv(argv, 2)[1:] == ["-m", "studies.run", "cfg.yaml", "--n-trials", "9", "--worker-index", "2"]


def test_sampler_seeds_differ_per_worker_and_resume_but_not_for_a_fresh_study():
    assert sampler_seed(7, 0, None) == 7
    seeds = {sampler_seed(7, 0, 0), sampler_seed(7, 0, 1), sampler_seed(7, 5, None), sampler_seed(7, 6, None)}
    assert len(seeds) == 4 and 7 not in seeds


def test_a_transient_error_in_a_trial_requeues_it_once_per_retry(home, write_config, tiny_space, monkeypatch):
    """A connection error inside a trial (after lower-level retries) fails the trial and queues
    the same parameters again; the retry records its lineage on the trial and on its MLflow run."""
    import models.mlp

    original = models.mlp.build
    failures = {"left": 1}

    def build(params, spec):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionResetError("S3 reset the connection")
        return original(params, spec)

    monkeypatch.setattr(models.mlp, "build", build)
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 2}))
    assert run_main([str(path), "--no-register"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    first, retry = study.trials[0], study.trials[1]
    assert first.state.name == "FAIL" and first.user_attrs["fail_reason"].startswith("transient: ConnectionResetError")
    assert retry.state.name == "COMPLETE" and retry.params == first.params
    assert retry.user_attrs["retry_of"] == 0 and retry.system_attrs["retry_history"] == [0]
    assert retry.user_attrs["seed"] == derive_seed(1, retry.number)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_run(first.user_attrs["mlflow_run_id"]).data.tags["workbench.requeued"] == "true"
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).data.tags["workbench.retry_of"] == "0"


def test_a_deterministic_error_is_not_requeued(home, write_config, tiny_space, monkeypatch):
    import models.mlp

    monkeypatch.setattr(models.mlp, "build", lambda params, spec: (_ for _ in ()).throw(ValueError("bad units")))
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 2, "max_failed": 2}))
    assert run_main([str(path), "--no-tracking"]) == 1
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert not [t for t in study.trials if "retry_of" in t.user_attrs]


def test_sigterm_fails_the_running_trial_and_ends_the_parent_run(home, write_config, tiny_space, monkeypatch):
    monkeypatch.setenv("CURVE_SECONDS", "0")  # each epoch's report seen at once by the watcher
    # 200 epochs (~1-2 s a trial): a 30-epoch trial took 0.3 s, and ended before the watcher's
    # signal (sent on a read that still saw it running) reached it.
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 50}, training={"epochs": 200, "batch_size": 32,
                                                                                   "early_stopping_patience": None}))
    url = f"sqlite:///{home / 'optuna.db'}"
    done = threading.Event()

    def sigterm_mid_trial():  # once the second trial has reported an epoch
        while not done.wait(0.2):
            try:
                trials = optuna.load_study(study_name="tiny", storage=url).get_trials(deepcopy=False)
            except Exception:  # not created yet
                continue
            if len(trials) >= 2 and trials[-1].state.name == "RUNNING" and trials[-1].intermediate_values:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=sigterm_mid_trial, daemon=True)
    watcher.start()
    try:
        code = run_main([str(path), "--no-register"])
    finally:
        done.set()
    assert code == 143
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    assert study.trials[0].state.name == "COMPLETE"
    last = study.trials[-1]
    assert last.state.name == "FAIL" and last.user_attrs["fail_reason"] == "interrupted (SIGTERM)"
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_run(last.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the runner put the handlers back
    # Seen in CI: the interrupted run had already met the budget, and the resume, finding nothing
    # to run, left the parent run KILLED. It now ends it (and would register the winner).
    assert run_main([str(path), "--no-register", "--n-trials", "1"]) == 0
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"
    assert run_main([str(path), "--no-register", "--n-trials", "1"]) == 0  # and once done, a no-op again


@pytest.mark.parametrize("moment", ["creating a trial", "telling a trial's state"])
def test_sigterm_during_optunas_own_steps_leaves_no_trial_running(home, write_config, tiny_space, monkeypatch, moment):
    """Seen in CI: SIGTERM landed while Optuna created a trial, outside the objective, and that
    trial stayed RUNNING. Optuna's steps now finish first; a trial they created ends interrupted."""
    import optuna.study._optimize as optimize_module

    def sigterm_after(call):
        def wrapped(*args, **kwargs):
            result = call(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # handled here, before `call`'s caller sees the result
            return result
        return wrapped

    if moment == "creating a trial":
        monkeypatch.setattr(optuna.Study, "ask", sigterm_after(optuna.Study.ask))
    else:
        monkeypatch.setattr(optimize_module, "_tell_with_warning", sigterm_after(optimize_module._tell_with_warning))
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 3}))
    assert run_main([str(path), "--no-tracking"]) == 143
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}").trials
    assert len(trials) == 1
    if moment == "creating a trial":
        assert trials[0].state.name == "FAIL" and trials[0].user_attrs["fail_reason"] == "interrupted (SIGTERM)"
    else:  # the trial had finished: its state is kept, and no further trial starts
        assert trials[0].state.name == "COMPLETE"


def test_sigterm_while_the_study_opens_exits_143(home, write_config, tiny_space, monkeypatch):
    """Seen with a SIGTERM sent right after start: the runner exited 130, as for Ctrl-C."""
    import studies.engines.runner as runner

    def opened_then_sigterm(*args, **kwargs):
        session = open_session(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return session

    open_session = runner.open_session
    monkeypatch.setattr(runner, "open_session", opened_then_sigterm)
    path = write_config(tiny_config(tiny_space))
    assert run_main([str(path), "--no-tracking"]) == 143
    assert optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}").trials == []


@pytest.mark.parametrize("moment", ["closing the runs", "registering the winner"])
def test_a_signal_after_the_trials_leaves_the_winner_to_a_rerun(home, write_config, tiny_space, monkeypatch, moment):
    """The study had finished: a signal while its runs were closed let them close, one while its
    winner was registered stopped that at once (both were ignored before: Ctrl-C could not stop a
    selection that evaluates the winner). Either way the exit code is 143 and a rerun registers."""
    import studies.engines.runner as runner
    import studies.selection as selection

    module, name = (runner, "_end_tracking") if moment == "closing the runs" else (selection, "select")
    real = getattr(module, name)

    def sigterm_first(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, sigterm_first)
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 2}))
    assert run_main([str(path)]) == 143
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"  # its records are whole
    assert client.search_model_versions("name='tiny'") == []
    monkeypatch.setattr(module, name, real)
    assert run_main([str(path)]) == 0
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}").trials) == 2


def test_once_the_trials_are_done_a_first_signal_waits_and_a_second_stops_at_once():
    from studies.engines.workers import Interrupted, SignalStop

    stop = SignalStop()
    try:
        stop.closing = True
        os.kill(os.getpid(), signal.SIGTERM)  # noted: the clean-up goes on
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.exit_code() == 143
    finally:
        stop.restore()


def test_a_signal_inside_a_deferred_section_is_raised_when_it_ends():
    from studies.engines.workers import Interrupted, SignalStop, signals_deferred

    stop = SignalStop()
    reached = []
    try:
        with pytest.raises(Interrupted, match="SIGTERM"):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("end of section")  # not cut in two
        assert reached == ["end of section"] and stop.exit_code() == 143
    finally:
        stop.restore()


def test_a_signal_inside_tensorflow_waits_for_it_to_return():
    """TensorFlow's C++ turned an Interrupted raised inside it into its own error (a trial then
    failed as an error and the study ran on, the signal spent; seen in CI as a container that
    ignored `podman stop`): a signal landing there is raised at the next safe point instead."""
    import tensorflow as tf

    from studies.engines.workers import Interrupted, SignalStop, raise_if_signalled

    class Rows:  # TensorFlow reads a sequence back through Python: the signal lands in TF's call
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> float:
            if i >= 3:
                raise IndexError(i)
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return float(i)

    stop = SignalStop()
    try:
        assert tf.constant(Rows()).numpy().tolist() == [0.0, 1.0, 2.0]
        with pytest.raises(Interrupted, match="SIGTERM"):
            raise_if_signalled()
        assert stop.exit_code() == 143
    finally:
        stop.restore()


def test_retry_log_marks_survive_trimming():
    log = RetryLog()
    for i in range(250):
        log.add("old", i, ConnectionError("down"))
    mark = log.mark()
    log.add("new", 1, ConnectionError("down"))
    assert log.since(mark) == ["new: attempt 1 failed (ConnectionError: down)"] and len(log.entries) == 200


def _open(url: str) -> str:
    from studies.storage import open_storage

    open_storage(url)
    return "ok"


def test_processes_creating_a_fresh_sqlite_storage_at_once_all_open_it(tmp_path):
    """Seen in the search-efficiency benchmark: two runs started together on a new SQLite file,
    one died with 'UNIQUE constraint failed: alembic_version.version_num'."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        for i in range(3):
            url = f"sqlite:///{tmp_path / f'fresh{i}.db'}"
            assert pool.map(_open, [url] * 6) == ["ok"] * 6


def test_a_sqlite_storage_is_written_ahead_and_others_read_it(tmp_path):
    import sqlite3

    import optuna

    from studies.storage import open_storage

    url = f"sqlite:///{tmp_path / 'wal.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with sqlite3.connect(tmp_path / "wal.db") as plain:  # the mode belongs to the file
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    # Optuna's own storage (as optuna-dashboard opens it) sees every commit.
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2


def test_a_lost_schema_race_opens_the_storage_again(tmp_path, monkeypatch):
    import studies.storage.rdb as storage_module

    real = storage_module.resilient_storage_class()
    calls = []

    class Racing(real):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(storage_module, "resilient_storage_class", lambda: Racing)
    storage_module.open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    assert len(calls) == 2


def _commits(storage) -> list[int]:
    import sqlalchemy

    counted: list[int] = []
    sqlalchemy.event.listen(storage.engine, "commit", lambda conn: counted.append(1))
    return counted


def test_a_trials_parameters_and_attributes_set_in_one_transaction_land_as_if_set_one_by_one(tmp_path):
    """studies.storage.rdb's one_transaction: the same trial rows, one commit instead of one a write."""
    import contextlib
    import functools

    from studies.storage import open_storage

    def objective(trial, storage, batched):
        with storage.one_transaction(trial._trial_id) if batched else contextlib.nullcontext():
            storage.set_trial_user_attrs(trial._trial_id, {"seed": trial.number, "worker": "w"})
            x = trial.suggest_float("x", 0, 1)
            n = trial.suggest_int("n", 1, 9, log=True)
            c = trial.suggest_categorical("c", ["a", "b", None])
        return x + n + (c is None)

    rows = {}
    for batched in (False, True):
        url = f"sqlite:///{tmp_path / f'{batched}.db'}"
        storage = open_storage(url)
        study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=1))
        study.optimize(functools.partial(objective, storage=storage, batched=batched), n_trials=2)  # names known here
        commits = _commits(storage)
        study.optimize(functools.partial(objective, storage=storage, batched=batched), n_trials=1)
        reloaded = optuna.load_study(study_name=study.study_name, storage=url)
        rows[batched] = ([(t.params, t.distributions, t.user_attrs, t.value) for t in reloaded.trials], len(commits))
    assert rows[True][0] == rows[False][0]
    # create the trial, (attributes + 3 parameters), tell: 3 commits against 6 (the heartbeat is off).
    assert rows[True][1] == rows[False][1] - 3


def test_one_transaction_checks_each_parameter_as_it_is_set_and_writes_what_was_set_when_the_block_raises(tmp_path):
    from studies.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # this process has stored x's distribution
    trial = study.ask()
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        with storage.one_transaction(trial._trial_id):
            trial.suggest_categorical("x", ["a", "b"])  # refused at once, as an unbatched write is
    with pytest.raises(KeyError, match="boom"):
        with storage.one_transaction(trial._trial_id):
            trial.suggest_float("x", 0, 1)
            storage.set_trial_user_attrs(trial._trial_id, {"k": 1})
            raise KeyError("boom")
    stored = storage.get_trial(trial._trial_id)
    assert set(stored.params) == {"x"} and stored.user_attrs == {"k": 1}
    # another storage's trial of the same id, written inside the block, is not held back with it
    other = open_storage(f"sqlite:///{tmp_path / 'other.db'}")
    other_study = optuna.create_study(storage=other)
    other_id = [other_study.ask()._trial_id for _ in range(trial._trial_id)][-1]
    assert other_id == trial._trial_id
    with storage.one_transaction(trial._trial_id):
        other.set_trial_user_attrs(other_id, {"here": True})
        assert other.get_trial(other_id).user_attrs == {"here": True}


def test_the_workbench_storage_writes_a_trials_rows_as_optunas_own_does(tmp_path):
    """studies.storage.trial_rows: upserts of user attributes and intermediate values (non-finite
    ones too), and the same refusals on a finished trial."""
    from studies.storage import open_storage

    def history(storage):
        study = optuna.create_study(storage=storage, study_name="s")
        trial_id = study.ask()._trial_id
        for step, value in ((0, 1.0), (1, float("inf")), (2, float("-inf")), (0, 0.5)):
            storage.set_trial_intermediate_value(trial_id, step, value)
        for attrs in ({"a": 1, "b": [1, 2]}, {"b": None, "c": "x"}):
            if hasattr(storage, "set_trial_user_attrs"):
                storage.set_trial_user_attrs(trial_id, attrs)
            else:
                for key, value in attrs.items():
                    storage.set_trial_user_attr(trial_id, key, value)
        storage.set_trial_intermediate_value(trial_id, 3, float("nan"))
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.PRUNED)
        refused = []
        for write in (lambda: storage.set_trial_intermediate_value(trial_id, 4, 1.0),
                      lambda: storage.set_trial_user_attrs(trial_id, {"d": 1}) if hasattr(storage, "set_trial_user_attrs")
                      else storage.set_trial_user_attr(trial_id, "d", 1)):
            with pytest.raises(optuna.exceptions.UpdateFinishedTrialError) as e:
                write()
            refused.append(str(e.value))
        trial = optuna.load_study(study_name="s", storage=storage).trials[0]
        values = {k: ("nan" if v != v else v) for k, v in trial.intermediate_values.items()}
        return values, trial.user_attrs, refused

    ours = history(open_storage(f"sqlite:///{tmp_path / 'ours.db'}"))
    assert ours == history(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optunas.db'}"))
    assert ours[0] == {0: 0.5, 1: float("inf"), 2: float("-inf"), 3: "nan"} and ours[1] == {"a": 1, "b": None, "c": "x"}


def test_a_trials_state_whose_commit_reply_was_lost_is_not_refused_on_the_retry(tmp_path, monkeypatch):
    """The commit lands, the connection drops before its reply: the retry finds the trial already
    in that state, which is success, not Optuna's UpdateFinishedTrialError."""
    import studies.storage.rdb as storage_module
    from studies.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    trial_id = optuna.create_study(storage=storage).ask()._trial_id
    real = optuna.storages.RDBStorage.set_trial_state_values
    calls = []

    def reply_lost_once(self, *args, **kwargs):
        calls.append(1)
        result = real(self, *args, **kwargs)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        return result

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", reply_lost_once)
    monkeypatch.setattr(storage_module, "STORAGE_MAX_DELAY", 0.0)
    assert storage.set_trial_state_values(trial_id, optuna.trial.TrialState.COMPLETE, [1.0]) is True
    assert len(calls) == 2 and storage.get_trial(trial_id).state == optuna.trial.TrialState.COMPLETE
    assert storage.retry_log.entries and "storage.set_trial_state_values" in storage.retry_log.entries[-1]


def test_the_trials_a_process_runs_are_read_from_memory_and_their_curves_written_with_their_next_write(tmp_path, monkeypatch):
    """studies.storage.running: at every point of a trial (created or taken from the queue), the
    storage's copy equals what another process reads from the database, in `get_trial` and in
    the study's trials, but for the intermediate values and system attributes (successive
    halving's rungs) set since the trial's last write; those land with its next one (a user
    attribute, its end: one statement of values a trial), or at once when a second has passed.
    A running trial is never read from the database but once as it leaves the queue: one the
    storage creates is kept as created (SQLite's timestamps read back exactly)."""
    import studies.storage.running as running
    from studies.storage import open_storage

    url = f"sqlite:///{tmp_path / 's.db'}"
    storage, other = open_storage(url), open_storage(url)  # `other`: a process that runs none of them
    built: list[tuple[int, str]] = []
    writes: list[dict] = []
    build = optuna.storages.RDBStorage._build_frozen_trial_from_trial_model
    write_values = running.trial_rows.write_intermediate_values

    def recorded(self, model):
        if self is storage:
            built.append((model.trial_id, model.state.name))
        return build(self, model)

    def counted(storage_, session, trial_id, values):
        writes.append(dict(values))
        return write_values(storage_, session, trial_id, values)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_build_frozen_trial_from_trial_model", recorded)
    monkeypatch.setattr(running.trial_rows, "write_intermediate_values", counted)
    study = optuna.create_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2))
    study.enqueue_trial({"x": 0.25}, user_attrs={"queued": True})
    checked = []

    def same(trial_id: int, *, written: bool) -> None:
        ours, theirs = storage.get_trial(trial_id), other.get_trial(trial_id)
        for held in ("intermediate_values", "system_attrs"):
            mine, stored = getattr(ours, held), getattr(theirs, held)
            assert stored.items() <= mine.items()
            assert (stored == mine) if written else (held == "system_attrs" or stored != mine), (held, stored, mine)
            setattr(theirs, held, mine)
        assert ours == theirs
        for states in (None, (optuna.trial.TrialState.RUNNING,)):
            mine = storage.get_all_trials(study._study_id, states=states)
            assert [t.number for t in mine] == [t.number for t in other.get_all_trials(study._study_id, states=states)]
        checked.append(trial_id)

    def objective(trial: optuna.Trial) -> float:
        same(trial._trial_id, written=True)
        with pytest.raises(KeyError):  # a study that does not exist, read while this process runs a trial
            storage.get_all_trials(study._study_id + 99)
        with storage.one_transaction(trial._trial_id):
            x = trial.suggest_float("x", 0, 1)
            trial.suggest_int("n", 1, 4)
            trial.suggest_categorical("c", [None, "a", 2])
            storage.set_trial_user_attrs(trial._trial_id, {"pair": (1, 2), "nested": {"k": [1.5]}})
        same(trial._trial_id, written=True)
        for step in range(4):
            trial.report(x + step / 10, step)
            same(trial._trial_id, written=False)
            pruned = trial.should_prune()  # successive halving sets its rungs at steps 1 and 2: held too
            assert ("completed_rung_0" in storage.get_trial(trial._trial_id).system_attrs) is (step >= 1)
            assert "completed_rung_0" not in other.get_trial(trial._trial_id).system_attrs  # held
            same(trial._trial_id, written=False)
            if pruned:
                raise optuna.TrialPruned
        trial.set_user_attr("seed", 3)  # a user attribute carries the curve and the rungs
        same(trial._trial_id, written=True)
        return x

    study.optimize(objective, n_trials=5)
    finished = other.get_all_trials(study._study_id)
    assert {t.state.name for t in finished} == {"PRUNED", "COMPLETE"} and len(checked) >= 30
    assert finished[0].user_attrs["queued"] is True
    reports = sum(len(t.intermediate_values) for t in finished)
    assert all(t.intermediate_values == {s: t.params["x"] + s / 10 for s in range(len(t.intermediate_values))} for t in finished)
    assert sum(map(len, writes)) == reports and len(writes) == len(finished), writes  # one statement a trial
    assert all(("completed_rung_0" in t.system_attrs) is (len(t.intermediate_values) >= 2) for t in finished)
    running_reads = [trial_id for trial_id, state in built if state == "RUNNING"]
    assert running_reads == [finished[0]._trial_id], built  # the queued one, as it left the queue

    # a report a second (FLUSH_SECONDS) after the trial's last write is written at once
    monkeypatch.setattr(running, "FLUSH_SECONDS", 0.0)
    trial = study.ask()
    trial.report(0.5, 0)
    assert other.get_trial(trial._trial_id).intermediate_values == {0: 0.5}
    storage.set_trial_system_attr(trial._trial_id, "rung", 1)
    assert other.get_trial(trial._trial_id).system_attrs["rung"] == 1
    study.tell(trial, 0.5)
    assert storage.get_trial(trial._trial_id).state.name == "COMPLETE"  # finished: read from the database
