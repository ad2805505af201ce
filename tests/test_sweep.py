"""Sweeps on the demo cohort against real storages: run tree, registry, PostgreSQL workers, kills."""

import os
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner

from mmbrca.cli import cli
from mmbrca.errors import UserError
from mmbrca.registry import register_best_trial
from mmbrca.sweep import load_sweep, resolve_storage
from tests.conftest import subprocess_env

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def sweep_file(tmp_path, cohort, name="s", **overrides):
    data = {
        "study_name": name, "cohort": str(cohort), "n_trials": 3, "folds": [0, 1],
        "objective": {"metric": "val_pr_auc", "direction": "maximize"},
        "sampler": {"name": "TPESampler", "args": {"seed": 0}},
        "pruner": {"name": "NopPruner"},
        "fixed": {"model.modality": "gene", "train.epochs": 2, "preprocess.top_genes": 50},
        "search_space": {"train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
                         "model.embed_dim": {"type": "categorical", "choices": [16, 32]}},
        "register": {"model_name": f"{name}-model", "alias": "champion"},
        "heartbeat_interval": 1, "grace_period": 4,
    } | overrides
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sweep_builds_the_run_tree_and_registers_the_best(feature_cohort, tmp_path, tracking, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = sweep_file(tmp_path, feature_cohort, fixed={"model.modality": "cross_attention", "train.epochs": 2,
                                                        "preprocess.top_genes": 50, "model.heads": 3},
                      search_space={"model.fusion_dim": {"type": "categorical", "choices": [12, 16]},
                                    "train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}},
                      constraints=["model.fusion_dim % model.heads == 0"])
    result = CliRunner().invoke(cli, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    storage, _ = resolve_storage(None, "s")
    study = optuna.load_study(study_name="s", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 3
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    trials = tracking.search_runs([tracking.get_run(parent_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in trials) == ["trial-000", "trial-001", "trial-002"]
    for trial_run, trial in zip(sorted(trials, key=lambda r: r.info.run_name), study.trials):
        assert trial_run.data.tags["state"] == trial.state.name
        folds = tracking.search_runs([trial_run.info.experiment_id],
                                     f"tags.mlflow.parentRunId = '{trial_run.info.run_id}'")
        if trial.params["model.fusion_dim"] == 16:  # 3 does not divide 16: pruned by the constraint
            assert trial.state.name == "PRUNED" and not folds
            continue
        assert sorted(r.info.run_name for r in folds) == [f"trial-{trial.number:03d}/fold-0",
                                                         f"trial-{trial.number:03d}/fold-1"]
        assert "val_pr_auc_mean" in trial_run.data.metrics and "test_pr_auc_std" in trial_run.data.metrics
        assert trial_run.data.params["train.lr"] == str(trial.params["train.lr"])
    artifacts = {a.path for a in tracking.list_artifacts(parent_id)}
    assert {"trials.csv", "optimization_history.png", "parallel_coordinate.png"} <= artifacts
    assert tracking.get_run(parent_id).data.params["sweep.pruner"] == "NopPruner"

    version = tracking.get_model_version_by_alias("s-model", "champion")
    assert version.tags["trial_number"] == str(study.best_trial.number)
    assert float(version.tags["objective"]) == pytest.approx(study.best_value)
    assert "±" in version.tags["cv_test_pr_auc"] and version.tags["cohort_fingerprint"]
    model = mlflow.pyfunc.load_model("models:/s-model@champion")
    predicted = model.predict(model.input_example)
    assert list(predicted.columns) == ["patient_id", "prob_Luminal", "prob_Basal/Her2", "predicted_class", "status",
                                       "message"]
    assert (predicted["status"] == "ok").all()


def test_alias_moves_only_to_a_better_version(feature_cohort, tmp_path, tracking, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = sweep_file(tmp_path, feature_cohort, name="a", n_trials=1)
    assert CliRunner().invoke(cli, ["sweep", str(path)]).exit_code == 0
    study = optuna.load_study(study_name="a", storage=resolve_storage(None, "a")[0])
    champion = tracking.get_model_version_by_alias("a-model", "champion")
    tracking.set_model_version_tag("a-model", champion.version, "objective", "2.0")  # pretend it scored higher
    worse = register_best_trial(study, "a-model", "champion")
    assert worse.version != champion.version
    assert tracking.get_model_version_by_alias("a-model", "champion").version == champion.version
    tracking.set_model_version_tag("a-model", champion.version, "objective", "-1.0")  # now it scored lower
    result = CliRunner().invoke(cli, ["register", "--study", "a", "--storage", "mmbrca-sweeps/a.journal",
                                      "--model-name", "a-model"])
    assert result.exit_code == 0, result.output
    newest = max(int(v.version) for v in tracking.search_model_versions("name = 'a-model'"))
    assert f"version {newest}" in result.stdout
    assert int(tracking.get_model_version_by_alias("a-model", "champion").version) == newest
    missing = CliRunner().invoke(cli, ["register", "--study", "nope", "--storage", "mmbrca-sweeps/a.journal",
                                       "--model-name", "a-model"])
    assert missing.exit_code == 2 and "no such study" in missing.stderr


@pytest.mark.parametrize(("edit", "message"), [
    ({"objective": {"metric": "test_pr_auc"}}, "objective.metric: must be an inner-validation metric"),
    ({"search_space": {"train.lr": {"type": "float", "low": 1, "high": 0.1}}}, "low must be below high"),
    ({"search_space": {"model.heads": {"type": "categorical"}}}, "search_space.model.heads.choices"),
    ({"search_space": {"model.nope": {"type": "int", "low": 1, "high": 3}}}, "unknown config key 'model.nope'"),
    ({"sampler": {"name": "MagicSampler"}}, "sampler.name: unknown sampler 'MagicSampler'"),
    ({"pruner": {"name": "MedianPruner", "args": 3}}, "pruner.args: expected a mapping"),
    ({"n_trials": 0}, "n_trials: expected a positive integer"),
    ({"folds": "some"}, "folds: expected 'all' or a list"),
    ({"colour": "red"}, "colour: unknown key"),
])
def test_malformed_sweep_files(tmp_path, edit, message):
    path = sweep_file(tmp_path, tmp_path, **edit)
    with pytest.raises(UserError, match=message):
        load_sweep(path)
    result = CliRunner().invoke(cli, ["sweep", str(path)])
    assert result.exit_code == 2 and message.split(":")[0] in result.stderr


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("study_name: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: invalid YAML"):
        load_sweep(path)


def _postgres_available() -> bool:
    try:
        optuna.storages.RDBStorage(POSTGRES)
    except Exception:
        return False
    return True


@pytest.mark.skipif(os.environ.get("CI") != "true" and not _postgres_available(), reason="no PostgreSQL here")
def test_two_workers_on_postgres_finish_exactly_n_trials(feature_cohort, tmp_path):
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    path = sweep_file(tmp_path, feature_cohort, name=study_name, n_trials=5, grace_period=60)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-m", "mmbrca", "sweep", str(path), "--workers", "2", "--storage", POSTGRES,
                           "--no-register"], capture_output=True, text=True, env=subprocess_env(uri), cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=study_name, storage=POSTGRES)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    client = mlflow.MlflowClient(uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["trial_number"] for r in runs) == ["0", "1", "2", "3", "4"]
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both worker processes took trials
    optuna.delete_study(study_name=study_name, storage=POSTGRES)


def test_killed_worker_trial_fails_and_rerun_completes(feature_cohort, tmp_path):
    path = sweep_file(tmp_path, feature_cohort, name="k", n_trials=2,
                      fixed={"model.modality": "gene", "train.epochs": 30, "train.patience": 30,
                             "preprocess.top_genes": 50})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "mmbrca", "sweep", str(path), "--no-register"]
    proc = subprocess.Popen(command, env=subprocess_env(uri), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    storage, _ = resolve_storage(str(tmp_path / "mmbrca-sweeps" / "k.journal"), "k")
    deadline = time.time() + 240
    running = []
    while time.time() < deadline and not running:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="k", storage=storage)
        except KeyError:
            continue
        running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                   if "fold_run_ids" in t.user_attrs]  # mid-trial: a fold is done
    assert running, "no trial got under way"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = running[0].number
    time.sleep(5)  # longer than grace_period: the dead worker's heartbeat is stale
    rerun = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(uri), cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = optuna.load_study(study_name="k", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states[killed] == "FAIL"
    assert sum(s == "COMPLETE" for s in states.values()) == 2
    run_id = study.trials[killed].user_attrs["mlflow_run_id"]
    killed_run = mlflow.MlflowClient(uri).get_run(run_id)
    assert killed_run.data.tags["state"] == "FAIL" and killed_run.info.status == "KILLED"
