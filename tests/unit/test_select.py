"""Selecting the winner and the alias rules, on the embedded MLflow store."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from studies.config.sections import StudyConfig
from studies.run import main as run_main
from studies.select import main as select_main
from studies.selection import NoWinner, alias_for, criterion, pick_winner
from tests.conftest import tiny_config


def fixed_space(tmp_path, name, optimizer, lr):
    path = tmp_path / f"space_{name}.yaml"
    path.write_text(yaml.safe_dump({"params": {
        "units": {"type": "categorical", "choices": [8, 16]},
        "optimizer": {"type": "fixed", "value": optimizer},
        "learning_rate": {"type": "fixed", "value": lr}}}))
    return path


def test_champion_challenger_force_rollback_and_idempotence(home, tmp_path, write_config, capsys, monkeypatch):
    good = write_config(tiny_config(fixed_space(tmp_path, "good", "adam", 0.01), study={"name": "good", "seed": 1},
                                    budget={"n_trials": 2}, training={"epochs": 6, "batch_size": 32},
                                    registry={"model_name": "m"}), "good.yaml")
    assert run_main([str(good)]) == 0  # registers the winner at the end
    assert "registered as m v1: test_loss" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("m", "champion")
    study = optuna.load_study(study_name="good", storage=f"sqlite:///{home / 'optuna.db'}")
    assert str(champion.version) == "1" and champion.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    assert champion.tags["workbench.trial_number"] == str(study.best_trial.number)
    assert champion.tags["workbench.study"] == "good" and "learning_rate" not in champion.tags["workbench.params"]
    assert float(champion.tags["workbench.test_loss"]) == pytest.approx(study.best_trial.user_attrs["test_loss"], rel=1e-4)

    import studies.engines.session
    import studies.selection.promote

    with monkeypatch.context() as m:  # the registered winner keeps its recorded metric: no data, no Keras
        m.setattr(studies.engines.session, "load_data", lambda loaded: pytest.fail("the data was loaded again"))
        m.setattr(studies.selection.promote, "_evaluate", lambda *a: pytest.fail("the winner was evaluated again"))
        assert select_main([str(good)]) == 0  # idempotent: the same run is not registered twice
    assert "already registered as m v1: test_loss = " in capsys.readouterr().out
    assert len(client.search_model_versions("name = 'm'")) == 1

    bad = write_config(tiny_config(fixed_space(tmp_path, "bad", "sgd", 1e-6), study={"name": "bad", "seed": 1},
                                   budget={"n_trials": 1}, training={"epochs": 1, "batch_size": 128},
                                   registry={"model_name": "m"}), "bad.yaml")
    assert run_main([str(bad)]) == 0
    assert "m v2" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("m", "challenger").version) == "2"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"

    assert select_main([str(bad), "--force"]) == 0
    forced = client.get_model_version_by_alias("m", "champion")
    assert str(forced.version) == "2" and forced.tags["workbench.previous_champion"] == "1"
    assert "forced" in forced.tags["workbench.alias_moves"]

    assert select_main([str(bad), "--rollback"]) == 0
    assert "moved back from v2 to v1" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert select_main([str(bad), "--rollback"]) == 1  # nothing older to go back to
    assert "no previous champion" in capsys.readouterr().err

    # Promotion on live traffic: v2 (worse on the test split) is @challenger beside champion v1.
    client.set_registered_model_alias("m", "challenger", "2")
    assert select_main([str(bad), "--promote-challenger"]) == 0  # no shadow rule: only the test metric counts
    assert "not promoted: test_loss" in capsys.readouterr().out
    _shadow_traffic(home, requests=4)
    assert select_main([str(bad), "--promote-challenger", "--min-agreement", "0", "--min-requests", "5"]) == 0
    out = capsys.readouterr().out
    assert "not promoted: test_loss" in out and "does not beat" in out and "4 shadow requests recorded, at least 5 needed" in out
    assert select_main([str(bad), "--promote-challenger", "--min-requests", "4", "--max-mean-abs-diff", "1"]) == 1
    assert "a classifier's shadow evidence is an agreement rate: give --min-agreement" in capsys.readouterr().err
    assert select_main([str(bad), "--promote-challenger", "--min-agreement", "0", "--min-requests", "4"]) == 0
    assert "@challenger v2 promoted to @champion (was v1): shadow evidence: 4 shadow requests (4 rows, 0 errors)" in (
        capsys.readouterr().out)
    promoted = client.get_model_version_by_alias("m", "champion")
    evidence = json.loads(promoted.tags["workbench.shadow_evidence"])
    assert str(promoted.version) == "2" and evidence["requests"] == 4 and evidence["champion"] == "1"
    assert "promoted from @challenger" in promoted.tags["workbench.alias_moves"]
    with pytest.raises(SystemExit):  # thresholds without the flag that uses them
        select_main([str(bad), "--min-agreement", "0.9"])


def _shadow_traffic(home, requests: int) -> None:
    """The API with champion v1 and SERVING_SHADOW_ALIAS=challenger (v2) takes `requests` requests."""
    from fastapi.testclient import TestClient

    from models import load_dataset
    from serving.app import create_app
    from serving.settings import ServingSettings
    from serving.store import Store

    settings = ServingSettings(serving_model_uri="models:/m@champion", serving_shadow_alias="challenger",
                               serving_shadow_fraction=1.0, workbench_home=home)
    rows = load_dataset(name="breast_cancer", seed=0).x_test[:requests]
    with TestClient(create_app(settings)) as api:  # loads both from the registry; shutdown logs the evidence
        assert [v["role"] for v in api.get("/model").json()["loaded"]] == ["champion", "challenger"]
        for row in rows:
            assert api.post("/predict", json={"instances": [row.tolist()]}).status_code == 200
    assert Store.at(settings).current_version("models:/m@challenger") == "2"


def _study(directions, values):
    study = optuna.create_study(directions=directions)
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v), params={}, distributions={}))
    return study


def _cfg(**registry):
    return StudyConfig.model_validate({
        "dataset": {"name": "diabetes"}, "model": {"family": "mlp"}, "search_space": "x.yaml",
        "objective": {"metrics": [{"name": "val_mae"}, {"name": "n_params"}]}, "pruner": {"type": "none"},
        "registry": registry})


def test_multi_objective_winner_respects_limits_and_primary():
    study = _study(["minimize", "minimize"], [(10.0, 5000), (20.0, 500), (30.0, 50)])
    assert pick_winner(study, _cfg()).number == 0
    assert pick_winner(study, _cfg(limits={"n_params": {"max": 1000}})).number == 1
    assert pick_winner(study, _cfg(primary="n_params")).number == 2
    with pytest.raises(NoWinner, match="meets registry.limits"):
        pick_winner(study, _cfg(limits={"n_params": {"max": 10}}))


def test_criterion_and_alias_rule():
    rule = criterion(_cfg())
    assert (rule.metric, rule.minimize) == ("test_mae", True)
    assert criterion(_cfg(primary="n_params")).metric == "n_params"
    assert alias_for(1.0, None, rule) == "champion"
    assert alias_for(1.0, 2.0, rule) == "champion"
    assert alias_for(2.0, 1.0, rule) == "challenger"
    assert alias_for(2.0, 2.0, rule) == "challenger"  # a tie does not move the champion
    assert alias_for(2.0, 1.0, rule, force=True) == "champion"


def test_registry_keys_are_checked():
    with pytest.raises(ValueError, match="must be one of the objective metrics"):
        _cfg(primary="val_loss")


def test_two_selectors_of_one_winner_both_set_the_champion(tmp_path):
    """Two processes of one study both register its winner at the end: the second alias insert
    fails on the key (the other inserted it meanwhile) and is set again; the history holds it once."""
    from mlflow.exceptions import MlflowException

    from serving.store import Store
    from studies.selection import CHAMPION, Registry

    registry = Registry(Store(f"sqlite:///{tmp_path / 'm.db'}"))
    client = registry.client
    client.create_registered_model("m")
    version = client.create_model_version("m", source=str(tmp_path)).version
    real = client.set_registered_model_alias
    calls = []

    def racing(name, alias, version):
        calls.append(alias)
        if len(calls) == 1:  # the other selector's insert lands first; ours then hits the key
            real(name, alias, version)
            raise MlflowException("duplicate key value violates unique constraint; Key (name, alias) already exists")
        real(name, alias, version)

    client.set_registered_model_alias = racing
    registry.make_champion("m", str(version), reason="first selector")
    registry.make_champion("m", str(version), reason="second selector")
    assert calls == [CHAMPION] * 3
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == str(version)
    assert registry.history("m") == [str(version)]
    client.set_registered_model_alias = lambda *a: (_ for _ in ()).throw(MlflowException("RESOURCE_DOES_NOT_EXIST"))
    with pytest.raises(MlflowException):  # any other refusal is not a race: raised as is
        registry.make_champion("m", str(version), reason="third")


def test_two_selectors_racing_on_the_history_and_version_tags_both_end_cleanly(tmp_path):
    """Seen in CI: two processes of one study selected the same winner at the same moment; the
    second insert of the champion history tag failed on SQLite's key and ended the study with a
    traceback. Tags are set again, as aliases are."""
    from mlflow.exceptions import MlflowException

    from serving.store import Store
    from studies.selection import CHAMPION, Registry

    registry = Registry(Store(f"sqlite:///{tmp_path / 'm.db'}"))
    client = registry.client
    client.create_registered_model("m")
    version = str(client.create_model_version("m", source=str(tmp_path)).version)
    raced = []

    def racing(real):
        def setter(*args):
            if real.__name__ not in raced:  # the other selector's insert lands first; ours then hits the key
                raced.append(real.__name__)
                real(*args)
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_tags.key")
            real(*args)
        return setter

    client.set_registered_model_tag = racing(client.set_registered_model_tag)
    client.set_model_version_tag = racing(client.set_model_version_tag)
    registry.make_champion("m", version, reason="first selector")
    assert sorted(raced) == ["set_model_version_tag", "set_registered_model_tag"]
    assert registry.history("m") == [version]
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == version


def test_registration_measures_serving_costs_again_and_passes_over_a_lucky_trial(home, tiny_space, write_config, capsys,
                                                                                 monkeypatch):
    """A trial times POST /predict in one burst; registering measures the candidate again over
    several (serving.probe.ServingProbe.confirm) and records that on the version. A candidate
    whose trial was lucky (within registry.limits by its burst, over them measured again) is
    passed over for the next; none left: no version, exit code 1."""
    from models.inference import Latency
    from serving.probe import ServingProbe

    cfg = tiny_config(tiny_space, study={"name": "lucky", "seed": 2}, budget={"n_trials": 2}, training={"epochs": 1},
                      tracking={"log_models": "all"}, registry={"model_name": "lucky", "auto": False,
                                                                "limits": {"latency_p50_ms": {"max": 50}}})
    path = write_config(cfg, "lucky.yaml")
    assert run_main([str(path)]) == 0
    study = optuna.load_study(study_name="lucky", storage=f"sqlite:///{home / 'optuna.db'}")
    best, other = sorted(study.trials, key=lambda t: (t.value, t.number))
    real, calls = ServingProbe.confirm, []

    def first_over(self, *args, **kwargs):  # the best candidate's cost, measured again, is over the limit
        calls.append(1)
        return Latency(1000.0, 2000.0) if len(calls) == 1 else real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ServingProbe, "confirm", first_over)
        assert select_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"trial {other.number} registered as lucky v1" in out, out
    assert f"passed over trial {best.number}: latency_p50_ms 1000 (the trial recorded {best.user_attrs['latency_p50_ms']})" in out
    version = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_model_version_by_alias("lucky", "champion")
    confirmed = {k: float(version.tags[f"workbench.{k}"]) for k in ("latency_p50_ms", "latency_batch64_ms", "model_bytes")}
    assert 0.02 < confirmed["latency_p50_ms"] < confirmed["latency_batch64_ms"] < 50
    assert 0.2 < confirmed["latency_p50_ms"] / other.user_attrs["latency_p50_ms"] < 5
    assert confirmed["model_bytes"] == other.user_attrs["model_bytes"]

    import studies.engines.session
    import studies.selection.promote

    with monkeypatch.context() as m:  # again: the trial passed over is remembered on its run, nothing is measured
        m.setattr(studies.engines.session, "load_data", lambda loaded: pytest.fail("the data was loaded again"))
        m.setattr(studies.selection.promote, "_evaluate", lambda *a: pytest.fail("a candidate was evaluated again"))
        assert select_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"trial {other.number} already registered as lucky v1" in out and "measured at an earlier selection" in out, out

    # a fresh registry name: every candidate over the limit measured again, none registered
    again = write_config({**cfg, "registry": {**cfg["registry"], "model_name": "lucky2"}}, "lucky2.yaml")
    with monkeypatch.context() as m:
        m.setattr(ServingProbe, "confirm", lambda self, *a, **k: Latency(1000.0, 2000.0))
        assert select_main([str(again)]) == 1
    err = capsys.readouterr().err
    assert "no trial of 'lucky' registered: measured again at registration" in err, err
    assert f"trial {best.number}: latency_p50_ms 1000" in err and f"trial {other.number}: latency_p50_ms 1000" in err
    assert not MlflowClient(f"sqlite:///{home / 'mlflow.db'}").search_model_versions("name = 'lucky2'")
