"""MLflow models: the fold model (one training run) and the registered ensemble (one sweep trial).

Fold model input: one row per patient: `patient_id`, `feature_paths` (tile feature files separated
by ';', empty for gene models) and one column per gene it uses (raw expression, as in the cohort).
Output: `patient_id`, `prob_<class>` for every class, `predicted_class`.

The registered ensemble is self-contained (encoder weights, extraction settings, preprocessing,
fold models) and takes raw slides and expression; its input and output are in `mmbrca.predict`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from mmbrca.config import Config, load_config
from mmbrca.data.bags import Batch, PatientBags, PatientRecord, attach_tile_counts, collate
from mmbrca.data.preprocess import GenePreprocessor, TileNormalizer
from mmbrca.errors import UserError
from mmbrca.models import build_model

PACKAGE_DIR = Path(__file__).resolve().parent


def predict_records(model: torch.nn.Module, records: list[PatientRecord], *, use_genes: bool, use_tiles: bool,
                    device: torch.device, batch_size: int = 8, tile_normalizer: TileNormalizer | None = None
                    ) -> tuple[np.ndarray, list]:
    """Class probabilities (N, C) with every tile of each patient, and the attention of each patient."""
    bags = PatientBags(records, use_genes=use_genes, use_tiles=use_tiles, bag_size=None,
                       tile_normalizer=tile_normalizer)
    probabilities, attention = [], []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(bags), batch_size):
            batch: Batch = collate([bags[i] for i in range(start, min(start + batch_size, len(bags)))]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(batch.genes, batch.tiles, batch.mask)
            probabilities.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
            for row in range(len(batch.labels)):
                if out.attention is None:
                    attention.append(None)
                else:
                    n = int(batch.mask[row].sum())
                    attention.append(out.attention[row].float().cpu().numpy()[..., :n])
    return np.concatenate(probabilities), attention


class FoldModel(mlflow.pyfunc.PythonModel):
    """One trained fold: network weights, config, gene preprocessing, class names, extraction settings."""

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        self.config: Config = load_config(artifacts["config"])
        meta = json.loads(Path(artifacts["meta"]).read_text())
        self.classes: list[str] = meta["classes"]
        self.extraction: dict | None = meta.get("extraction")  # cohort features manifest: params, encoder_source
        self.preprocessor = (GenePreprocessor.from_json(Path(artifacts["preprocess"]).read_text())
                             if meta["uses_genes"] else None)
        self.model = build_model(self.config.model, n_genes=meta["n_genes"], n_classes=len(self.classes))
        self.model.load_state_dict(torch.load(artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.eval()
        self.uses_genes, self.uses_tiles = meta["uses_genes"], meta["uses_tiles"]
        self.tile_normalizer = (TileNormalizer.from_json(Path(artifacts["tile_normalizer"]).read_text())
                                if self.uses_tiles else None)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input.reset_index(drop=True)
        probabilities = self.probabilities(frame)
        return prediction_frame(frame["patient_id"].astype(str).tolist(), probabilities, self.classes)

    def probabilities(self, frame: pd.DataFrame, *, impute_missing: bool = False) -> np.ndarray:
        """(N, C) for rows with `patient_id`, `feature_paths` (';'-separated) and raw gene columns."""
        frame = frame.reset_index(drop=True)
        genes = self.preprocessor.transform(frame, impute_missing=impute_missing) if self.uses_genes else None
        paths = frame["feature_paths"].fillna("").astype(str) if "feature_paths" in frame else [""] * len(frame)
        records = []
        for row, patient in enumerate(frame["patient_id"].astype(str)):
            files = [Path(p) for p in paths[row].split(";") if p.strip()] if self.uses_tiles else []
            records.append(PatientRecord(patient_id=patient, label=0, site="",
                                         genes=genes[row] if genes is not None else None, feature_files=files))
        if self.uses_tiles:
            attach_tile_counts(records)
        probabilities, _ = predict_records(self.model, records, use_genes=self.uses_genes, use_tiles=self.uses_tiles,
                                           device=torch.device("cpu"), tile_normalizer=self.tile_normalizer)
        return probabilities


def prediction_frame(patients: list[str], probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    out = pd.DataFrame({"patient_id": patients})
    for i, name in enumerate(classes):
        out[f"prob_{name}"] = probabilities[:, i].astype(np.float64)
    out["predicted_class"] = [classes[i] for i in probabilities.argmax(axis=1)]
    return out


def model_input(records: list[PatientRecord], expression: pd.DataFrame | None) -> pd.DataFrame:
    """The pyfunc input rows for cohort patients: id, feature files and the raw `expression` (patients ×
    the model's genes; None for image models)."""
    frame = pd.DataFrame({"patient_id": [r.patient_id for r in records],
                          "feature_paths": [";".join(str(f) for f in r.feature_files) for r in records]})
    if expression is not None:
        raw = expression.loc[frame["patient_id"]]
        frame = pd.concat([frame, raw.reset_index(drop=True).astype("float64")], axis=1)
    return frame


def fold_signature(genes: list[str], classes: list[str]) -> mlflow.models.ModelSignature:
    """The fold model's columns, stated rather than inferred from its example (which is slow for 1,000 genes)."""
    from mlflow.types import ColSpec, Schema

    inputs = [ColSpec("string", "patient_id"), ColSpec("string", "feature_paths")]
    inputs += [ColSpec("double", gene) for gene in genes]
    outputs = ([ColSpec("string", "patient_id")] + [ColSpec("double", f"prob_{c}") for c in classes]
               + [ColSpec("string", "predicted_class")])
    return mlflow.models.ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def pip_requirements() -> list[str]:
    """What the model needs to run; given explicitly so MLflow does not infer them (slow)."""
    import h5py
    import sklearn

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"pandas=={pd.__version__}",
            f"numpy=={np.__version__}", f"h5py=={h5py.__version__}", f"scikit-learn=={sklearn.__version__}",
            "pyyaml", "openslide-python", "openslide-bin", "tifffile", "imagecodecs", "scikit-image", "torchvision"]


def log_fold_model(*, model: torch.nn.Module, config: Config, preprocessor: GenePreprocessor | None,
                   tile_normalizer: TileNormalizer | None, classes: list[str], input_example: pd.DataFrame,
                   workdir: Path, extraction: dict | None = None, name: str = "model"):
    """Log the fold model as an MLflow pyfunc model (with the mmbrca package as code)."""
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), workdir / "weights.pt")
    (workdir / "config.yaml").write_text(config.to_yaml())
    meta = {"classes": classes, "uses_genes": model.uses_genes, "uses_tiles": model.uses_tiles,
            "n_genes": preprocessor.n_genes if preprocessor else 0, "extraction": extraction}
    (workdir / "meta.json").write_text(json.dumps(meta))
    artifacts = {"weights": str(workdir / "weights.pt"), "config": str(workdir / "config.yaml"),
                 "meta": str(workdir / "meta.json")}
    if preprocessor is not None:
        (workdir / "preprocess.json").write_text(preprocessor.to_json())
        artifacts["preprocess"] = str(workdir / "preprocess.json")
    if tile_normalizer is not None:
        (workdir / "tile_normalizer.json").write_text(tile_normalizer.to_json())
        artifacts["tile_normalizer"] = str(workdir / "tile_normalizer.json")
    signature = fold_signature(preprocessor.genes if preprocessor is not None else [], classes)
    with _no_copy_progress_bars():
        return mlflow.models.Model.log(artifact_path=None, name=name, flavor=_PyfuncSavedOnce,
                                       flavor_name="pyfunc.CustomPythonModel", validate_serving_input=False,
                                       python_model=FoldModel(), artifacts=artifacts, code_paths=[str(PACKAGE_DIR)],
                                       pip_requirements=pip_requirements(), input_example=input_example,
                                       signature=signature)


@contextmanager
def _no_copy_progress_bars():
    """MLflow draws a progress bar for each local file it copies into a model (five per fold model),
    unless the user set MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR themselves."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


class _PyfuncSavedOnce:
    """`mlflow.pyfunc` for `Model.log`, without the serving check that loads the saved model again."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(**kwargs):
        kwargs.pop("validate_serving_input", None)
        return mlflow.pyfunc.save_model(**kwargs)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The registered model: a trial's fold models, the tile encoder and extraction settings.

    Predicts from raw slides and expression (see `mmbrca.predict`), averaging the class
    probabilities of the fold models, or with one fold's model (`params={"fold": k}`).
    """

    def load_context(self, context) -> None:
        from mmbrca.predict import PredictorSettings
        from mmbrca.wsi.features import load_encoder

        artifacts = context.artifacts
        self.settings = PredictorSettings.from_json(Path(artifacts["settings"]).read_text())
        keys = sorted((k for k in artifacts if k.startswith("fold")), key=lambda k: int(k.removeprefix("fold")))
        self.members = [mlflow.pyfunc.load_model(artifacts[k]).unwrap_python_model() for k in keys]
        self.encoder = load_encoder(artifacts["encoder"]) if "encoder" in artifacts else None

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from mmbrca.predict import predict_raw

        params = params or {}
        fold = int(params.get("fold", -1))
        if fold != -1 and fold not in self.settings.folds:
            raise MlflowException(f"fold {fold}: the model holds folds {self.settings.folds}",
                                  error_code=INVALID_PARAMETER_VALUE)
        members = self.members if fold == -1 else [self.members[self.settings.folds.index(fold)]]
        try:
            return predict_raw(model_input, self.settings, members, self.encoder,
                               allow_missing_genes=bool(params.get("allow_missing_genes", False)))
        except UserError as exc:  # bad input: the server answers 400, Python callers get the message
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def ensemble_signature(settings) -> mlflow.models.ModelSignature:
    """Input: patient_id (required), slide/feature/expression paths and gene columns (optional)."""
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = [ColSpec("string", "patient_id"), ColSpec("string", "slide_path", required=False),
              ColSpec("string", "feature_paths", required=False), ColSpec("string", "expression_path", required=False)]
    inputs += [ColSpec("double", gene, required=False) for gene in settings.genes]
    outputs = ([ColSpec("string", "patient_id")] + [ColSpec("double", f"prob_{c}") for c in settings.classes]
               + [ColSpec("string", "predicted_class", required=False), ColSpec("string", "status"),
                  ColSpec("string", "message", required=False)])
    params = ParamSchema([ParamSpec("fold", "long", -1), ParamSpec("allow_missing_genes", "boolean", False)])
    return mlflow.models.ModelSignature(Schema(inputs), Schema(outputs), params)


def _settings(members: list[FoldModel], fold_runs: list):
    """The ensemble's settings from its fold models (which must agree on classes and extraction) and
    the training cohort their runs name."""
    from mmbrca.predict import PredictorSettings
    from mmbrca.wsi.extract import extraction_settings

    first, tags = members[0], fold_runs[0].data.tags
    for member in members[1:]:
        if member.classes != first.classes or (member.extraction or {}).get("params") != (
                first.extraction or {}).get("params"):
            raise UserError("the fold models disagree on classes or feature extraction settings; retrain them on "
                            "one cohort with one set of features")
    extraction = first.extraction
    if first.uses_tiles and extraction is None:  # fold models logged before they carried it
        extraction = extraction_settings(tags["cohort_path"])
    manifest = Path(tags["cohort_path"]) / "cohort.json"
    return PredictorSettings(
        classes=list(first.classes), genes=sorted({g for m in members if m.preprocessor for g in m.preprocessor.genes}),
        folds=[int(float(r.data.tags["fold"])) for r in fold_runs], uses_genes=first.uses_genes,
        uses_tiles=first.uses_tiles, extraction=extraction,
        label_map=json.loads(manifest.read_text()).get("label_map") if manifest.is_file() else None,
        cohort_fingerprint=tags.get("cohort_fingerprint"))


def _example(cohort_path: Path, settings) -> pd.DataFrame:
    """Two training patients as raw input rows: slide paths, cached features and expression."""
    from mmbrca.predict import cohort_input

    rows = cohort_input(cohort_path, settings.genes, use_features=True, extraction=settings.extraction)
    complete = pd.Series(True, index=rows.index)
    if settings.uses_tiles:
        complete &= rows["slide_path"] != ""
    if settings.genes:
        complete &= rows[settings.genes].notna().all(axis=1)
    return rows[complete].head(2).drop(columns=["true_class", "fold"]).reset_index(drop=True)


def _better(new: float, old: float, direction: str) -> bool:
    return new > old if direction == "maximize" else new < old


def log_ensemble(fold_run_ids: list[str], *, run_id: str, card: Callable[[object, dict], str] | None = None):
    """Log the fold models of `fold_run_ids` as one self-contained pyfunc model in run `run_id`.

    Returns (ModelInfo, settings, model card text).
    """
    import tempfile

    from mmbrca.wsi.features import encoder_for_identity

    client = mlflow.MlflowClient()
    fold_runs = [client.get_run(r) for r in fold_run_ids]
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {f"fold{i}": mlflow.artifacts.download_artifacts(f"runs:/{r}/model", dst_path=f"{tmp}/fold{i}")
                     for i, r in enumerate(fold_run_ids)}
        members = [mlflow.pyfunc.load_model(path).unwrap_python_model() for path in artifacts.values()]
        settings = _settings(members, fold_runs)
        if settings.uses_tiles:
            encoder = encoder_for_identity(settings.extraction["params"]["encoder"],
                                           settings.extraction.get("encoder_source"))
            torch.save(encoder.state_dict(), f"{tmp}/encoder.pt")
            artifacts["encoder"] = f"{tmp}/encoder.pt"
        Path(f"{tmp}/settings.json").write_text(settings.to_json())
        artifacts["settings"] = f"{tmp}/settings.json"
        text = card(settings, fold_runs[0].data.tags) if card else ""
        if text:
            Path(f"{tmp}/model_card.md").write_text(text)
            artifacts["model_card"] = f"{tmp}/model_card.md"
        example = _example(Path(fold_runs[0].data.tags["cohort_path"]), settings)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="ensemble", python_model=EnsembleModel(), artifacts=artifacts, code_paths=[str(PACKAGE_DIR)],
                pip_requirements=pip_requirements(), input_example=example, signature=ensemble_signature(settings))
    return info, settings, text


def register_best_trial(study, model_name: str, alias: str = "champion", *, cohort_fingerprint: str = ""):
    """Register the best trial's fold ensemble; move `alias` only if it beats the current holder.

    Returns the new ModelVersion. Tags: study, trial, objective, CV mean±std of test metrics,
    cohort fingerprint; its description is the model card.
    """
    from mmbrca.model_card import model_card

    client = mlflow.MlflowClient()
    best = study.best_trial
    trial_run = best.user_attrs["mlflow_run_id"]
    cv = {metric: tuple(values) for metric, values in best.user_attrs.get("cv_test", {}).items()}
    direction = study.direction.name.lower()
    info, _, card = log_ensemble(
        best.user_attrs["fold_run_ids"], run_id=trial_run,
        card=lambda settings, tags: model_card(model_name=model_name, settings=settings, cohort_path=tags["cohort_path"],
                                               modality=tags["modality"], study=study.study_name, trial=best, cv=cv,
                                               direction=direction))
    version = mlflow.register_model(info.model_uri, model_name)
    client.update_model_version(model_name, version.version, description=card)
    tags = {"study": study.study_name, "trial_number": str(best.number), "objective": repr(best.value),
            "direction": direction, "cohort_fingerprint": cohort_fingerprint, "trial_run_id": trial_run}
    for metric, (mean, std) in cv.items():
        tags[f"cv_{metric}"] = f"{mean:.4f} ± {std:.4f}"
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    try:
        current = client.get_model_version_by_alias(model_name, alias)
        current_value = float(current.tags.get("objective", "nan"))
        move = current.version == version.version or np.isnan(current_value) or _better(best.value, current_value,
                                                                                            direction)
    except mlflow.exceptions.MlflowException:
        move = True  # nobody holds the alias yet
    if move:
        client.set_registered_model_alias(model_name, alias, version.version)
    return client.get_model_version(model_name, version.version)
