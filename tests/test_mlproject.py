"""The MLflow project: every declared parameter is used, and `mlflow run` builds a cohort."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_every_parameter_appears_in_its_command():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert spec["conda_env"] == "conda.yaml"
    for name, entry in spec["entry_points"].items():
        used = set(re.findall(r"\{(\w+)\}", entry["command"]))
        assert used == set(entry.get("parameters", {})), name
        assert entry["command"].startswith("python -m mmbrca "), name


def test_conda_env_lists_the_runtime_dependencies():
    import tomllib

    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(pip) == sorted(declared)
    assert "python=3.11" in conda["dependencies"]


def test_mlflow_run_cohort_entry_point(demo_raw, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = subprocess_env(uri)
    out = tmp_path / "cohort"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "cohort", "--env-manager", "local",
         "-P", f"out={out}", "-P", f"expression={demo_raw / 'expression.tsv'}",
         "-P", f"labels={demo_raw / 'labels.csv'}", "-P", f"slides={demo_raw / 'slides'}", "-P", "folds=3"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "folds.csv").is_file()
    runs = MlflowClient(uri).search_runs(experiment_ids=["0"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["folds"] == "3"

    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "extract", "--env-manager", "local",
         "-P", f"cohort={out}", "-P", "weights=none", "-P", "tiles_per_slide=1", "-P", "tile_size=64"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = yaml.safe_load((out / "features" / "manifest.json").read_text())
    assert manifest["params"]["tiles_per_slide"] == 1 and manifest["slides"]
    (extract_run,) = [r for r in MlflowClient(uri).search_runs(experiment_ids=["0"]) if r.info.run_id != runs[0].info.run_id]
    assert extract_run.info.status == "FINISHED"
    assert extract_run.data.metrics["slides_done"] == len(manifest["slides"])


def test_mlflow_run_main_trains_a_fold(feature_cohort, tmp_path):
    """`mlflow run . -P fold=1 --env-manager local`: the run, its metrics, artifacts and model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = subprocess_env(uri)
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-P", "fold=1", "--env-manager", "local",
         "-P", f"cohort={feature_cohort}", "-P", "epochs=4", "-P", "top_genes=100", "-P", "bag_size=8",
         "--experiment-name", "proj"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Downloading artifacts" not in proc.stderr and "Warning:" not in proc.stderr, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "cross_attention/fold-1"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"  # the project run is the training run
    assert run.data.params["train.epochs"] == "4" and run.data.params["fold"] == "1"
    for name in ("accuracy", "pr_auc", "f1", "roc_auc", "mcc", "balanced_accuracy"):
        assert f"test_{name}" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss") if m.step] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pr_curve.png", "confusion_matrix.png", "test_predictions.csv", "folds.csv", "config.yaml"} <= artifacts
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        example = model.input_example
        out = model.predict(example)
        assert list(out.columns) == ["patient_id", "prob_Luminal", "prob_Basal/Her2", "predicted_class"]
        assert np.allclose(out[["prob_Luminal", "prob_Basal/Her2"]].sum(axis=1), 1)
    finally:
        mlflow.set_tracking_uri(None)


def test_mlflow_run_sweep_entry_point(feature_cohort, tmp_path):
    """`mlflow run . -e sweep`: the project run becomes the sweep's parent run."""
    from mlflow.tracking import MlflowClient

    from tests.test_sweep import sweep_file

    path = sweep_file(tmp_path, feature_cohort, name="proj", n_trials=1, folds=[0])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "sweep", "--env-manager", "local",
         "-P", f"config={path}", "-P", f"storage={tmp_path / 'proj.journal'}"],
        capture_output=True, text=True, env=subprocess_env(uri), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs(["0"])
    (project,) = [r for r in runs if r.data.tags.get("mmbrca.step") == "sweep"]
    assert project.info.run_name == "sweep/proj" and project.data.tags.get("mlflow.project.entryPoint") == "sweep"
    (trial,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == project.info.run_id]
    assert trial.info.run_name == "trial-000" and trial.data.tags["state"] == "COMPLETE"
    assert client.get_model_version_by_alias("proj-model", "champion")
