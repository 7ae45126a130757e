"""The runner CLI against the real PostgreSQL: resume, two concurrent processes, errors, URLs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import optuna
import pytest

from tests.conftest import ROOT, tiny_config

HOME = tempfile.mkdtemp(prefix="workbench-it-")  # the embedded MLflow store of these runs, not the repo's


def run_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "WORKBENCH_HOME": HOME, **(env or {})}
    full_env.pop("OPTUNA_STORAGE", None)
    return subprocess.Popen([sys.executable, "-m", "studies.run", *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_study_resumed_by_a_second_run(postgres_url, study_name, write_config, tiny_space):
    path = write_config(tiny_config(tiny_space))
    code, out, err = finish(run_cli(str(path), "--storage", postgres_url, "--study-name", study_name, "--n-trials", "2"))
    assert code == 0, err
    code, out, err = finish(run_cli(str(path), "--storage", postgres_url, "--study-name", study_name, "--n-trials", "3"))
    assert code == 0, err
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert "COMPLETE 3" in out


def test_two_processes_add_trials_to_one_study(postgres_url, study_name, write_config, tiny_space):
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 6}))
    args = (str(path), "--storage", postgres_url, "--study-name", study_name)
    procs = [run_cli(*args), run_cli(*args)]
    results = [finish(p) for p in procs]
    for code, _out, err in results:
        assert code == 0, err
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    # The budget holds across processes: overshoot at most one trial per extra process.
    assert 6 <= len(finished) <= 7
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "FAIL")]


def test_bad_config_exits_2_with_the_key_path(postgres_url, write_config, tiny_space):
    path = write_config(tiny_config(tiny_space, sampler={"type": "tpe", "options": {"n_startup": 1}}))
    code, out, err = finish(run_cli(str(path), "--storage", postgres_url))
    assert code == 2
    assert err.startswith(f"{path}: sampler.options.n_startup: not an option of TPESampler")
    assert "Traceback" not in err


def test_url_query_parameters_reach_the_driver(postgres_url, study_name, write_config, tiny_space):
    path = write_config(tiny_config(tiny_space, budget={"n_trials": 1}))
    separator = "&" if "?" in postgres_url else "?"
    # sslmode=disable works against the local server; the same mechanism carries sslmode=require to RDS.
    code, _, err = finish(run_cli(str(path), "--storage", f"{postgres_url}{separator}sslmode=disable&connect_timeout=5",
                                  "--study-name", study_name))
    assert code == 0, err
    # sslmode=require against a server without TLS: a clear message and exit 1, not a traceback.
    code, _, err = finish(run_cli(str(path), "--storage", f"{postgres_url}{separator}sslmode=require", "--study-name", study_name))
    # A server that offers TLS accepts it; one that does not must give a clear message and exit 1.
    assert code == 0 or (code == 1 and "cannot open storage" in err and "Traceback" not in err), err


def test_missing_database_is_reported(postgres_url, write_config, tiny_space):
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(database="workbench_no_such_db").render_as_string(hide_password=False)
    code, _, err = finish(run_cli(str(write_config(tiny_config(tiny_space))), "--storage", url))
    assert code == 1
    assert "cannot open storage" in err and "workbench_no_such_db" in err and "Traceback" not in err


def test_a_running_trial_kept_in_memory_is_what_postgres_holds(postgres_url, study_name, monkeypatch):
    """studies.storage.running on PostgreSQL: a trial the storage creates is kept as Optuna
    created it, never read back (PostgreSQL's timestamps keep microseconds), and equals what
    another process reads, but for the curve and system attributes set since its last write,
    which land with its next one; the study's other trials are read past it, and a missing
    study raises as Optuna's storage does."""
    from studies.storage import open_storage

    storage, other = open_storage(postgres_url), open_storage(postgres_url)
    reads: list[int] = []
    build = type(storage)._build_frozen_trial_from_trial_model
    monkeypatch.setattr(type(storage), "_build_frozen_trial_from_trial_model",
                        lambda self, model: (reads.append(model.trial_id) if self is storage else None, build(self, model))[1])
    study = optuna.create_study(storage=storage, study_name=study_name)
    study.enqueue_trial({"x": 0.1})
    other_trial = optuna.load_study(study_name=study_name, storage=other).ask()  # another process's, running
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.report(0.5, 0)
    storage.set_trial_system_attr(trial._trial_id, "completed_rung_0", 0.5)
    ours, theirs = storage.get_trial(trial._trial_id), other.get_trial(trial._trial_id)
    assert theirs.intermediate_values == {} and theirs.system_attrs == {} and ours.intermediate_values == {0: 0.5}
    trial.set_user_attr("seed", 1)
    assert storage.get_trial(trial._trial_id) == other.get_trial(trial._trial_id)
    assert [t._trial_id for t in storage.get_all_trials(study._study_id)] == [other_trial._trial_id, trial._trial_id]
    with pytest.raises(KeyError):
        storage.get_all_trials(study._study_id + 10_000)
    assert trial._trial_id not in reads and other_trial._trial_id in reads  # ours never read back; theirs read
