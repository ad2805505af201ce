"""MLflow models: the trained fold model with its preprocessing as a pyfunc model.

Input: a DataFrame with one row per patient: `patient_id`, `feature_paths` (tile feature files
separated by ';', empty for gene models) and one column per gene the model uses (raw expression,
as in the cohort). Output: `patient_id`, `prob_<class>` for every class, `predicted_class`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from mmbrca.config import Config, load_config
from mmbrca.data.bags import Batch, PatientBags, PatientRecord, attach_tile_counts, collate
from mmbrca.data.preprocess import GenePreprocessor, TileNormalizer
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
    """One trained fold: network weights, config, gene preprocessing and class names."""

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        self.config: Config = load_config(artifacts["config"])
        meta = json.loads(Path(artifacts["meta"]).read_text())
        self.classes: list[str] = meta["classes"]
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
        genes = self.preprocessor.transform(frame) if self.uses_genes else None
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
        return prediction_frame(frame["patient_id"].astype(str).tolist(), probabilities, self.classes)


def prediction_frame(patients: list[str], probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    out = pd.DataFrame({"patient_id": patients})
    for i, name in enumerate(classes):
        out[f"prob_{name}"] = probabilities[:, i].astype(np.float64)
    out["predicted_class"] = [classes[i] for i in probabilities.argmax(axis=1)]
    return out


def model_input(records: list[PatientRecord], cohort, preprocessor: GenePreprocessor | None) -> pd.DataFrame:
    """The pyfunc input rows for cohort patients: id, feature files, raw expression of the model's genes."""
    frame = pd.DataFrame({"patient_id": [r.patient_id for r in records],
                          "feature_paths": [";".join(str(f) for f in r.feature_files) for r in records]})
    if preprocessor is not None:
        raw = cohort.expression(genes=preprocessor.genes).loc[frame["patient_id"]]
        frame = pd.concat([frame, raw.reset_index(drop=True).astype("float64")], axis=1)
    return frame


def pip_requirements() -> list[str]:
    """What the model needs to run; given explicitly so MLflow does not infer them (slow)."""
    import h5py
    import sklearn

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"pandas=={pd.__version__}",
            f"numpy=={np.__version__}", f"h5py=={h5py.__version__}", f"scikit-learn=={sklearn.__version__}",
            "pyyaml", "openslide-python", "openslide-bin", "tifffile", "imagecodecs", "scikit-image", "torchvision"]


def log_fold_model(*, model: torch.nn.Module, config: Config, preprocessor: GenePreprocessor | None,
                   tile_normalizer: TileNormalizer | None, classes: list[str], input_example: pd.DataFrame,
                   output_example: pd.DataFrame, workdir: Path, name: str = "model"):
    """Log the fold model as an MLflow pyfunc model (with the mmbrca package as code)."""
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), workdir / "weights.pt")
    (workdir / "config.yaml").write_text(config.to_yaml())
    meta = {"classes": classes, "uses_genes": model.uses_genes, "uses_tiles": model.uses_tiles,
            "n_genes": preprocessor.n_genes if preprocessor else 0}
    (workdir / "meta.json").write_text(json.dumps(meta))
    artifacts = {"weights": str(workdir / "weights.pt"), "config": str(workdir / "config.yaml"),
                 "meta": str(workdir / "meta.json")}
    if preprocessor is not None:
        (workdir / "preprocess.json").write_text(preprocessor.to_json())
        artifacts["preprocess"] = str(workdir / "preprocess.json")
    if tile_normalizer is not None:
        (workdir / "tile_normalizer.json").write_text(tile_normalizer.to_json())
        artifacts["tile_normalizer"] = str(workdir / "tile_normalizer.json")
    signature = mlflow.models.infer_signature(input_example, output_example)  # no extra model load to infer it
    return mlflow.pyfunc.log_model(name=name, python_model=FoldModel(), artifacts=artifacts,
                                   code_paths=[str(PACKAGE_DIR)], pip_requirements=pip_requirements(),
                                   input_example=input_example, signature=signature)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The fold models of one trial; predicts the mean class probability over folds."""

    def load_context(self, context) -> None:
        keys = sorted(k for k in context.artifacts if k.startswith("fold"))
        self.models = [mlflow.pyfunc.load_model(context.artifacts[k]) for k in keys]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        outputs = [m.predict(model_input[_input_names(m, model_input)]) for m in self.models]
        prob_columns = [c for c in outputs[0].columns if c.startswith("prob_")]
        mean = np.mean([o[prob_columns].to_numpy() for o in outputs], axis=0)  # (N, C)
        classes = [c.removeprefix("prob_") for c in prob_columns]
        return prediction_frame(outputs[0]["patient_id"].tolist(), mean, classes)


def _input_names(model, frame: pd.DataFrame) -> list[str]:
    """The columns a member model declares (each fold kept its own genes); all if it declares none."""
    schema = model.metadata.get_input_schema()
    return [c for c in schema.input_names() if c in frame.columns] if schema is not None else list(frame.columns)


def _ensemble_example(fold_model_uris: list[str]) -> pd.DataFrame:
    """Input rows with the union of the fold models' genes (each fold selected its own)."""
    from mmbrca.data.cohort import load_cohort

    examples = [mlflow.pyfunc.load_model(uri).input_example for uri in fold_model_uris]
    base = examples[0][["patient_id", "feature_paths"]]
    genes = sorted({c for e in examples for c in e.columns} - {"patient_id", "feature_paths"})
    if not genes:
        return base
    cohort_path = Path(mlflow.get_run(fold_model_uris[0].split("/")[1]).data.tags["cohort_path"])
    raw = load_cohort(cohort_path).expression(genes=genes).loc[base["patient_id"]]
    return pd.concat([base.reset_index(drop=True), raw.reset_index(drop=True).astype("float64")], axis=1)


def _better(new: float, old: float, direction: str) -> bool:
    return new > old if direction == "maximize" else new < old


def register_best_trial(study, model_name: str, alias: str = "champion", *, cohort_fingerprint: str = ""):
    """Register the best trial's fold ensemble; move `alias` only if it beats the current holder.

    Returns the new ModelVersion. Tags: study, trial, objective, CV mean±std of test metrics,
    cohort fingerprint.
    """
    client = mlflow.MlflowClient()
    best = study.best_trial
    trial_run = best.user_attrs["mlflow_run_id"]
    fold_uris = [f"runs:/{run_id}/model" for run_id in best.user_attrs["fold_run_ids"]]
    example = _ensemble_example(fold_uris)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        members = {f"fold{i}": mlflow.artifacts.download_artifacts(uri, dst_path=f"{tmp}/fold{i}")
                   for i, uri in enumerate(fold_uris)}
        ensemble = EnsembleModel()
        ensemble.models = [mlflow.pyfunc.load_model(path) for path in members.values()]
        output = ensemble.predict(None, example)
        with mlflow.start_run(run_id=trial_run):
            info = mlflow.pyfunc.log_model(
                name="ensemble", python_model=EnsembleModel(), artifacts=members, code_paths=[str(PACKAGE_DIR)],
                pip_requirements=pip_requirements(), input_example=example,
                signature=mlflow.models.infer_signature(example, output))
    version = mlflow.register_model(info.model_uri, model_name)
    direction = study.direction.name.lower()
    tags = {"study": study.study_name, "trial_number": str(best.number), "objective": repr(best.value),
            "direction": direction, "cohort_fingerprint": cohort_fingerprint, "trial_run_id": trial_run}
    for metric, (mean, std) in best.user_attrs.get("cv_test", {}).items():
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
