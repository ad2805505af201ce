"""Registered models predict from raw slides and expression: CLI, fresh process, serving, bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from mmbrca.cli import cli
from mmbrca.data.cohort import load_cohort
from mmbrca.data.expression import read_expression
from mmbrca.data.slides import find_slides, match_slides
from tests.conftest import subprocess_env

MODEL = "predict-model"
CHAMPION = f"models:/{MODEL}@champion"


@pytest.fixture(scope="module")
def registered(feature_cohort, demo_raw, tmp_path_factory):
    """A one-trial cross-attention sweep over folds 0 and 1 on a copy of the demo cohort, registered;
    the cohort copy is deleted afterwards, so only the registry holds what prediction needs.
    New patients' raw inputs are copies of the demo slides and expression."""
    from mmbrca.sweep import load_sweep, run_sweep

    root = tmp_path_factory.mktemp("predict")
    cohort = root / "cohort"
    shutil.copytree(feature_cohort, cohort)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    spec_path = root / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({
        "study_name": "p", "cohort": str(cohort), "n_trials": 1, "folds": [0, 1],
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "sampler": {"name": "RandomSampler", "args": {"seed": 0}}, "pruner": {"name": "NopPruner"},
        "fixed": {"model.modality": "cross_attention", "train.epochs": 3, "preprocess.top_genes": 40,
                  "model.heads": 2, "model.fusion_dim": 16},
        "search_space": {"train.lr": {"type": "float", "low": 1e-3, "high": 2e-3, "log": True}},
        "register": {"model_name": MODEL, "alias": "champion"}}))
    try:
        study = run_sweep(load_sweep(spec_path), storage=str(root / "p.journal"))
        fold_runs = dict(zip([0, 1], study.best_trial.user_attrs["fold_run_ids"]))
        folds = load_cohort(cohort).folds.copy()
        shutil.rmtree(cohort)
        new = root / "new"
        shutil.copytree(demo_raw / "slides", new / "slides")
        shutil.copy(demo_raw / "expression.tsv", new / "expression.tsv")
        yield {"uri": uri, "root": root, "new": new, "fold_runs": fold_runs, "folds": folds,
               "trial_run": study.best_trial.user_attrs["mlflow_run_id"]}
    finally:
        mlflow.set_tracking_uri(None)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture()
def in_store(registered, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    mlflow.set_tracking_uri(registered["uri"])
    yield mlflow.MlflowClient(registered["uri"])
    mlflow.set_tracking_uri(None)


def _expression_rows(registered, patients: list[str]) -> pd.DataFrame:
    """Raw input rows (slide_path + gene columns) for demo patients, from the copied raw files."""
    expression = read_expression(registered["new"] / "expression.tsv", set(patients)).values  # replicate rule
    slides, _ = match_slides(find_slides(registered["new"] / "slides"), set(patients))
    frame = pd.DataFrame({"patient_id": patients, "slide_path": [";".join(slides[p]) for p in patients]})
    genes = expression.loc[patients].reset_index(drop=True)
    return pd.concat([frame, genes.astype("float64")], axis=1)


def test_fresh_process_predicts_new_patients_from_raw_files(registered, tmp_path):
    out = tmp_path / "p.csv"
    env = subprocess_env(registered["uri"])
    command = [sys.executable, "-m", "mmbrca", "predict", "--model", CHAMPION, "--out", str(out),
               "--expression", str(registered["new"] / "expression.tsv"), "--slides", str(registered["new"] / "slides")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    predicted = pd.read_csv(out)
    expression_patients = {c[:12] for c in pd.read_csv(registered["new"] / "expression.tsv", sep="\t",
                                                       index_col=0, nrows=0).columns if c[13:15] < "10"}
    assert set(predicted["patient_id"]) == expression_patients
    assert list(predicted.columns) == ["patient_id", "prob_Luminal", "prob_Basal/Her2", "predicted_class",
                                       "status", "message"]
    ok = predicted[predicted["status"] == "ok"]
    np.testing.assert_allclose(ok["prob_Luminal"] + ok["prob_Basal/Her2"], 1.0, rtol=1e-6)
    failed = predicted[predicted["status"] == "error"]
    assert all("no slide_path" in m for m in failed["message"])  # demo patients without a slide
    assert len(ok) >= 0.8 * len(predicted)
    assert done.returncode == (1 if len(failed) else 0), done.stderr
    assert "patients predicted" in done.stdout and "predict" in done.stderr  # summary and progress bar


@pytest.mark.parametrize("fold", [0, 1])
def test_raw_slide_predictions_equal_the_logged_test_predictions(registered, in_store, fold):
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(
        f"runs:/{registered['fold_runs'][fold]}/test_predictions.csv"))
    model = mlflow.pyfunc.load_model(CHAMPION)
    rows = _expression_rows(registered, logged["patient_id"].tolist())
    predicted = model.predict(rows, params={"fold": fold})
    assert (predicted["status"] == "ok").all(), predicted["message"].tolist()
    assert predicted["patient_id"].tolist() == logged["patient_id"].tolist()
    for column in ("prob_Luminal", "prob_Basal/Her2"):
        np.testing.assert_allclose(predicted[column], logged[column], atol=1e-5)
    assert predicted["predicted_class"].tolist() == logged["predicted_class"].tolist()
    ensemble = model.predict(rows)  # both folds averaged: a different number
    assert not np.allclose(ensemble["prob_Luminal"], predicted["prob_Luminal"], atol=1e-4)


def test_model_card_and_self_contained_artifacts(registered, in_store):
    version = in_store.get_model_version_by_alias(MODEL, "champion")
    card = version.description
    for heading in ("## Training cohort", "## Label map", "## Cross-validated performance", "## Intended use",
                    "## Limits"):
        assert heading in card
    assert "test_pr_auc" in card and "Luminal vs Basal/Her2" in card and "`BRCA.LumA` → Luminal" in card
    local = Path(mlflow.artifacts.download_artifacts(CHAMPION))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"artifacts/encoder.pt", "artifacts/settings.json", "artifacts/model_card.md"} <= files
    settings = json.loads((local / "artifacts/settings.json").read_text())
    assert settings["folds"] == [0, 1] and settings["extraction"]["params"]["tile_size"] == 112
    assert settings["extraction"]["params"]["encoder"] == "random-init-seed0"
    assert settings["label_map"]["map"]["BRCA.LumA"] == "Luminal" and settings["classes"] == ["Luminal", "Basal/Her2"]


def _model_genes(registered) -> list[str]:
    mlflow.set_tracking_uri(registered["uri"])
    try:
        schema = mlflow.models.get_model_info(CHAMPION).signature.inputs
    finally:
        mlflow.set_tracking_uri(None)
    return [name for name in schema.input_names() if not name.endswith(("_id", "_path", "_paths"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_ready(server: subprocess.Popen, port: int, log: Path, attempts: int = 240) -> None:
    """Poll /ping once a second; fail with the server's log if it exits or never answers."""
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None:
            break
        time.sleep(1)
    pytest.fail(f"model server not ready: {log.read_text()[-3000:]}")


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_served_model_answers_like_predict(registered, tmp_path):
    patients = registered["folds"].index[:3].tolist()
    rows = _expression_rows(registered, [p for p in patients])
    rows.loc[1, "slide_path"] = str(tmp_path / "missing.svs")  # that row fails, the others are predicted
    rows.to_csv(tmp_path / "rows.csv", index=False)
    port = _free_port()
    env = subprocess_env(registered["uri"])
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    try:
        _wait_until_ready(server, port, tmp_path / "server.log")
        body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False)), "params": {"fold": 1}}
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", body)
        assert status == 200, answer
        served = pd.DataFrame(answer["predictions"])
        used = _model_genes(registered)
        bad = _post(f"http://127.0.0.1:{port}/invocations",
                    {"dataframe_split": json.loads(rows.drop(columns=used[:2]).to_json(orient="split", index=False))})
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = tmp_path / "cli.csv"
    done = CliRunner(env={"MLFLOW_TRACKING_URI": registered["uri"]}).invoke(
        cli, ["predict", "--model", CHAMPION, "--out", str(out), "--fold", "1", "--expression",
              str(registered["new"] / "expression.tsv"), "--slides", str(registered["new"] / "slides")])
    assert done.exit_code in (0, 1), done.output
    expected = pd.read_csv(out).set_index("patient_id").loc[patients]
    assert served["status"].tolist() == ["ok", "error", "ok"]
    assert "missing.svs" in served["message"][1]
    for column in ("prob_Luminal", "prob_Basal/Her2"):
        np.testing.assert_allclose(served[column][[0, 2]], expected[column].iloc[[0, 2]], atol=1e-6)
    assert served["predicted_class"][0] == expected["predicted_class"].iloc[0]
    assert bad[0] == 400 and "2 of the model's" in bad[1]["message"] and used[0] in bad[1]["message"]


def _predict(registered, tmp_path, *args: str):
    out = tmp_path / "out.csv"
    result = CliRunner(env={"MLFLOW_TRACKING_URI": registered["uri"]}).invoke(
        cli, ["predict", "--model", CHAMPION, "--out", str(out), *args])
    return result, (pd.read_csv(out).set_index("patient_id") if out.exists() else None)


def test_missing_genes_are_listed_or_imputed_and_extra_genes_ignored(registered, tmp_path):
    used = _model_genes(registered)
    matrix = pd.read_csv(registered["new"] / "expression.tsv", sep="\t", index_col=0)
    slides = ["--slides", str(registered["new"] / "slides")]
    matrix.drop(index=used[:3]).to_csv(tmp_path / "fewer.tsv", sep="\t")
    result, table = _predict(registered, tmp_path, "--expression", str(tmp_path / "fewer.tsv"), *slides)
    assert result.exit_code == 2 and table is None and not list(tmp_path.glob("*.csv"))
    assert result.stderr.count("\n") == 1 and all(g in result.stderr for g in used[:3])
    assert "--allow-missing-genes" in result.stderr

    imputed_run, imputed = _predict(registered, tmp_path, "--expression", str(tmp_path / "fewer.tsv"), *slides,
                                    "--allow-missing-genes")
    assert imputed_run.exit_code in (0, 1), imputed_run.output
    ok = imputed[imputed["status"] == "ok"]
    assert len(ok) and ok["message"].str.contains("imputed 3 of").all()

    extra = pd.concat([matrix, pd.DataFrame([np.arange(matrix.shape[1], dtype=float)], index=["NOT_A_GENE"],
                                            columns=matrix.columns)])
    extra.to_csv(tmp_path / "extra.tsv", sep="\t")
    _, with_extra = _predict(registered, tmp_path, "--expression", str(tmp_path / "extra.tsv"), *slides)
    _, plain = _predict(registered, tmp_path, "--expression", str(registered["new"] / "expression.tsv"), *slides)
    pd.testing.assert_frame_equal(with_extra, plain)
    assert not np.allclose(ok["prob_Luminal"], plain.loc[ok.index, "prob_Luminal"])  # imputation did change inputs


def test_unreadable_slide_fails_only_its_row(registered, tmp_path):
    slides = tmp_path / "slides"
    shutil.copytree(registered["new"] / "slides", slides)
    broken = sorted(slides.glob("*-01Z-*.svs"))[0]
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    result, table = _predict(registered, tmp_path, "--expression", str(registered["new"] / "expression.tsv"),
                             "--slides", str(slides))
    patient = broken.name[:12]
    assert result.exit_code == 1
    assert table.loc[patient, "status"] == "error" and broken.name in table.loc[patient, "message"]
    assert np.isnan(table.loc[patient, "prob_Luminal"])
    assert (table.drop(index=patient)["status"] == "ok").sum() >= len(table) - 1 - (table["message"].str.contains(
        "no slide_path").sum())
    assert f"failed: {patient}" in result.stderr


@pytest.mark.parametrize(("uri", "fragment"), [("models:/no-such-model@champion", "no-such-model"),
                                               (f"models:/{MODEL}/99", f"models:/{MODEL}/99"),
                                               ("runs:/0123456789abcdef/ensemble", "runs:/0123456789abcdef")])
def test_unknown_model_uri_is_one_line(registered, tmp_path, uri, fragment):
    result = CliRunner(env={"MLFLOW_TRACKING_URI": registered["uri"]}).invoke(
        cli, ["predict", "--model", uri, "--out", str(tmp_path / "o.csv"), "--expression",
              str(registered["new"] / "expression.tsv")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr
    assert not (tmp_path / "o.csv").exists()


def test_bad_options(registered, tmp_path):
    fold, _ = _predict(registered, tmp_path, "--fold", "4", "--expression", str(registered["new"] / "expression.tsv"))
    assert fold.exit_code == 2 and "--fold 4: the model holds folds [0, 1]" in fold.stderr
    half, _ = _predict(registered, tmp_path, "--fold", "0.5", "--expression", str(registered["new"] / "expression.tsv"))
    assert half.exit_code == 2 and "--fold must be a whole number, got 0.5" in half.stderr
    both, _ = _predict(registered, tmp_path, "--cohort", str(tmp_path), "--expression", "x.tsv")
    assert both.exit_code == 2 and "--cohort cannot be combined" in both.stderr
    neither, _ = _predict(registered, tmp_path)
    assert neither.exit_code == 2 and "give --cohort" in neither.stderr


def test_expression_files_and_cached_features_give_the_same_predictions(registered, in_store, feature_cohort,
                                                                        tmp_path):
    model = mlflow.pyfunc.load_model(CHAMPION)
    patients = registered["folds"].index[:4].tolist()
    rows = _expression_rows(registered, patients)
    from_columns = model.predict(rows)
    per_patient = rows[["patient_id", "slide_path"]].copy()
    genes = rows.drop(columns=["patient_id", "slide_path"])
    for i, patient in enumerate(patients):  # one file per patient: gene id and value, like a GDC download
        genes.iloc[i].rename_axis("gene_id").rename("value").to_csv(tmp_path / f"{patient}.tsv", sep="\t")
    per_patient["expression_path"] = [str(tmp_path / f"{p}.tsv") for p in patients]
    from_files = model.predict(per_patient)
    pd.testing.assert_frame_equal(from_files, from_columns)

    result, table = _predict(registered, tmp_path, "--cohort", str(feature_cohort))  # the cohort's cached features
    assert result.exit_code in (0, 1), result.output
    assert {"true_class", "fold"} <= set(table.columns)
    np.testing.assert_allclose(table.loc[patients, "prob_Luminal"], from_columns["prob_Luminal"], atol=1e-5)


def test_any_model_uri_predicts(registered, tmp_path, feature_cohort):
    rows = ["--expression", str(registered["new"] / "expression.tsv"), "--slides", str(registered["new"] / "slides")]
    by_alias, alias_table = _predict(registered, tmp_path, *rows)
    out = tmp_path / "v.csv"
    runner = CliRunner(env={"MLFLOW_TRACKING_URI": registered["uri"]})
    for uri in (f"models:/{MODEL}/1", f"runs:/{registered['trial_run']}/ensemble"):
        result = runner.invoke(cli, ["predict", "--model", uri, "--out", str(out), *rows])
        assert result.exit_code == by_alias.exit_code, result.output
        pd.testing.assert_frame_equal(pd.read_csv(out).set_index("patient_id"), alias_table)
    fold_model = runner.invoke(cli, ["predict", "--model", f"runs:/{registered['fold_runs'][0]}/model", "--out",
                                     str(out), "--cohort", str(feature_cohort)])
    assert fold_model.exit_code == 2 and "not a registered mmbrca model" in fold_model.stderr


def test_out_of_fold_predictions_on_the_training_cohort(registered, feature_cohort, tmp_path):
    result, table = _predict(registered, tmp_path, "--cohort", str(feature_cohort), "--out-of-fold")
    assert result.exit_code == 1  # the tiny sweep trained folds 0 and 1 only: the other folds' rows fail
    for fold, run_id in registered["fold_runs"].items():
        logged = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/test_predictions.csv",
                                                                 tracking_uri=registered["uri"]))
        held_out = table.loc[logged["patient_id"]]
        assert (held_out["fold"] == fold).all() and (held_out["status"] == "ok").all()
        np.testing.assert_allclose(held_out["prob_Luminal"], logged["prob_Luminal"], atol=1e-5)
    others = table[~table["fold"].isin([0, 1])]
    assert len(others) and (others["status"] == "error").all()
    assert others["message"].str.contains("has no model").all()
    assert table.index.tolist() == load_cohort(feature_cohort).table["patient_id"].tolist()  # input order

    warned, ensemble = _predict(registered, tmp_path, "--cohort", str(feature_cohort))
    assert "ensemble predictions are optimistic" in warned.stderr and len(ensemble) == len(table)
    elsewhere = tmp_path / "other"  # another cohort (here: the same files under another fingerprint)
    shutil.copytree(feature_cohort, elsewhere)
    manifest = json.loads((elsewhere / "cohort.json").read_text())
    manifest["fingerprint"] = "0" * 64
    (elsewhere / "cohort.json").write_text(json.dumps(manifest))
    refused, _ = _predict(registered, tmp_path, "--cohort", str(elsewhere), "--out-of-fold")
    assert refused.exit_code == 2 and "not the model's training cohort" in refused.stderr


def test_mlflow_run_predict_entry_point(registered, tmp_path):
    """`mlflow run . -e predict`: the registered model on raw files, one fold."""
    expression = read_expression(registered["new"] / "expression.tsv", None,
                                 genes=set(_model_genes(registered))).values
    slides, _ = match_slides(find_slides(registered["new"] / "slides"), set(expression.index))
    with_slides = [p for p in expression.index if p in slides]
    expression.loc[with_slides].T.to_csv(tmp_path / "expression.tsv", sep="\t")  # genes x samples
    out = tmp_path / "p.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(Path(__file__).parents[1]), "-e", "predict", "--env-manager",
         "local", "-P", f"model={CHAMPION}", "-P", f"expression={tmp_path / 'expression.tsv'}",
         "-P", f"slides={registered['new'] / 'slides'}", "-P", f"out={out}", "-P", "fold=1"],
        capture_output=True, text=True, env=subprocess_env(registered["uri"]), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out).set_index("patient_id")
    assert sorted(table.index) == sorted(with_slides) and (table["status"] == "ok").all()
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{registered['fold_runs'][1]}/test_predictions.csv",
                                                             tracking_uri=registered["uri"])).set_index("patient_id")
    shared = logged.index.intersection(table.index)
    assert len(shared)
    np.testing.assert_allclose(table.loc[shared, "prob_Luminal"], logged.loc[shared, "prob_Luminal"], atol=1e-5)
