"""The one-fold trainer on the demo cohort: honest splits, no leakage, learning, tracking, bad input."""

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mmbrca.cli import cli
from mmbrca.config import load_config
from mmbrca.data.cohort import load_cohort
from mmbrca.train import setup_data, train_fold

FAST = ["epochs=25", "lr=1e-3", "batch_size=8", "bag_size=8", "top_genes=200", "patience=25"]


def test_splits_are_disjoint_and_test_is_the_fold(feature_cohort):
    cohort = load_cohort(feature_cohort)
    config = load_config(None, ["fold=2", "model.modality=cross_attention"])
    data = setup_data(cohort, config, True, True)
    ids = {name: {r.patient_id for r in records} for name, records in data.records.items()}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"]) and ids["val"].isdisjoint(ids["test"])
    assert ids["test"] == {p for p in ids["test"] if cohort.folds[p] == 2}
    eligible = cohort.table[cohort.table["has_expression"] & cohort.table["has_slide"]]
    assert ids["test"] == set(eligible["patient_id"][eligible["patient_id"].map(cohort.folds) == 2])
    assert data.excluded == len(cohort.table) - len(eligible)


def test_preprocessing_is_fitted_on_training_patients_only(feature_cohort):
    cohort = load_cohort(feature_cohort)
    config = load_config(None, ["fold=0", "model.modality=gene", "top_genes=50"])
    data = setup_data(cohort, config, True, False)
    train_ids = [r.patient_id for r in data.records["train"]]
    raw = np.log2(cohort.expression() + 1)
    pre = data.preprocessor
    assert pre.log_transform  # RSEM-like values
    expected_genes = raw.loc[train_ids].var(ddof=0).sort_values(ascending=False, kind="stable").index[:50]
    assert set(pre.genes) == set(expected_genes)
    np.testing.assert_allclose(pre.mean, raw.loc[train_ids, pre.genes].mean().to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(pre.scale, raw.loc[train_ids, pre.genes].std(ddof=0).to_numpy(), rtol=1e-4)
    everyone = raw[pre.genes].mean().to_numpy()
    assert not np.allclose(pre.mean, everyone, rtol=1e-3)  # other patients would have moved it
    standardized = np.stack([r.genes for r in data.records["train"]])
    np.testing.assert_allclose(standardized.mean(axis=0), 0, atol=1e-4)


def test_trains_learns_and_logs_everything(feature_cohort, tracking, tmp_path):
    # fold 2: on this 30-patient cohort the 5-patient validation split of fold 1 selects the epoch-1 model
    config = load_config(None, ["fold=2", "model.modality=cross_attention", *FAST])
    result = train_fold(feature_cohort, config, progress=False)
    positive_rate = (result.predictions["true_class"] == "Basal/Her2").mean()
    assert result.metrics["test_pr_auc"] > positive_rate + 0.25
    for split in ("train", "val", "test"):
        for name in ("loss", "accuracy", "pr_auc", "f1", "roc_auc", "mcc", "balanced_accuracy"):
            assert f"{split}_{name}" in result.metrics

    # attention over tiles is not uniform after training
    spreads = [a.max(-1) / np.maximum(a.min(-1), 1e-9) for a in result.attention.values() if a.shape[-1] > 1]
    assert np.mean([s.mean() for s in spreads]) > 1.5

    run = tracking.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "cross_attention/fold-2"
    params, tags = run.data.params, run.data.tags
    assert params["model.heads"] == "4" and params["train.lr"] == "0.001" and params["train.fold"] == "2"
    assert tags["fold"] == "2" and tags["modality"] == "cross_attention" and tags["cohort_fingerprint"]
    assert tags["git_commit"]
    history = [m for m in tracking.get_metric_history(result.run_id, "val_loss") if m.step > 0]  # step 0: final
    assert sorted(m.step for m in history) == list(range(1, result.epochs_run + 1))
    assert len([m for m in tracking.get_metric_history(result.run_id, "lr") if m.step > 0]) == result.epochs_run
    assert all(not math.isnan(run.data.metrics[f"test_{n}"]) for n in ("accuracy", "f1", "mcc", "balanced_accuracy"))
    artifacts = {a.path for a in tracking.list_artifacts(result.run_id)}
    assert {"pr_curve.png", "confusion_matrix.png", "test_predictions.csv", "folds.csv", "config.yaml"} <= artifacts
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest == tags["cohort_fingerprint"]

    model_uri = f"runs:/{result.run_id}/model"
    model = mlflow.pyfunc.load_model(model_uri)
    assert model.metadata.signature is not None
    from mmbrca.registry import model_input

    raw = load_cohort(feature_cohort).expression(genes=result.data.preprocessor.genes)
    frame = model_input(result.data.records["test"], raw)
    assert list(frame.columns) == model.metadata.get_input_schema().input_names()
    predicted = model.predict(frame)
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/test_predictions.csv"))
    np.testing.assert_allclose(predicted["prob_Basal/Her2"].to_numpy(), logged["prob_Basal/Her2"].to_numpy(),
                               atol=1e-5)
    # the example a model server receives, through MLflow's own serving input path (not re-checked at logging)
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    served_path = tmp_path / "served.json"
    mlflow.models.predict(model_uri, input_path=str(local / "serving_input_example.json"), content_type="json",
                          output_path=str(served_path), env_manager="local")
    served = pd.DataFrame(json.loads(served_path.read_text())["predictions"])
    expected = logged.set_index("patient_id").loc[served["patient_id"]]
    assert len(served) == 2 and list(served["predicted_class"]) == list(expected["predicted_class"])
    np.testing.assert_allclose(served["prob_Basal/Her2"], expected["prob_Basal/Her2"], atol=1e-5)


@pytest.mark.parametrize("modality", ["gene", "image", "concat"])
def test_baselines_train(feature_cohort, tracking, modality):
    config = load_config(None, [f"model.modality={modality}", "fold=0", *FAST, "epochs=3"])
    result = train_fold(feature_cohort, config, progress=False, log_model=False)
    assert 0 <= result.metrics["test_accuracy"] <= 1
    assert tracking.get_run(result.run_id).info.run_name == f"{modality}/fold-0"


@pytest.mark.parametrize(("args", "message"), [
    (["--fold", "5"], "--fold 5 is out of range"),
    (["--fold", "-1"], "--fold -1 is out of range"),
    (["--fold", "0", "--set", "model.heads=3"], "heads must divide model.fusion_dim, got heads=3, fusion_dim=128"),
    (["--fold", "0", "--set", "lr=0"], "train.lr must be positive, got 0"),
    (["--fold", "0", "--set", "epochs=-2"], "train.epochs must be positive"),
    (["--fold", "0", "--set", "model.modality=lstm"], "model.modality must be one of"),
])
def test_bad_input_before_training(feature_cohort, tracking, args, message):
    result = CliRunner().invoke(cli, ["train", str(feature_cohort), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not tracking.search_experiments(filter_string="name = 'mmbrca'")  # nothing was started


def test_unknown_modality_choice(feature_cohort):
    result = CliRunner().invoke(cli, ["train", str(feature_cohort), "--fold", "0", "--modality", "vit"])
    assert result.exit_code == 2 and "'vit' is not one of" in result.stderr


def test_modality_needs_its_inputs(demo_raw, demo_cohort, tmp_path, tracking):
    no_features = CliRunner().invoke(cli, ["train", str(demo_cohort.path), "--fold", "0", "--modality", "image"])
    assert no_features.exit_code == 2
    assert f"run `mmbrca extract {demo_cohort.path}` first" in no_features.stderr
    from mmbrca.data.cohort import CohortOptions, build_cohort
    from mmbrca.data.labels import LabelMap

    build_cohort(tmp_path / "slides_only", expression_path=None, labels_path=demo_raw / "labels.csv",
                 slides_dir=demo_raw / "slides", options=CohortOptions(label_map=LabelMap.default()))
    no_expression = CliRunner().invoke(cli, ["train", str(tmp_path / "slides_only"), "--fold", "0", "--modality", "gene"])
    assert no_expression.exit_code == 2
    assert "needs expression and no patient has any" in no_expression.stderr
