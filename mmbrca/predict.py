"""Inference from raw inputs: one slide and one expression profile per patient → class probabilities.

The input is a table with one row per patient:

    patient_id       required
    slide_path       slide file(s), ';'-separated; may be empty for gene models
    feature_paths    precomputed feature files (.h5 from `mmbrca extract`), used instead of slide_path
    expression_path  a file with the patient's expression (one sample, or a matrix holding it)
    <gene id> …      raw expression values, one column per gene (instead of expression_path)

Slides are tiled and encoded exactly as at training time (the settings and the encoder travel
with the model) into a temporary directory. A row whose slide or expression cannot be used gets
status `error` and the reason in `message`; the other rows are still predicted.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mmbrca.errors import UserError

STATUS_OK, STATUS_ERROR = "ok", "error"


@dataclass
class PredictorSettings:
    """What a registered model needs besides its fold models (stored as JSON beside them)."""

    classes: list[str]
    genes: list[str]  # union of the fold models' genes
    folds: list[int]  # the test fold of each member, in member order
    uses_genes: bool
    uses_tiles: bool
    extraction: dict | None  # the features' content params (encoder, mpp, tile_size, tiles_per_slide, ...)
    label_map: dict | None = None  # raw label → class, as the training cohort used it
    cohort_fingerprint: str | None = None  # the training cohort's

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PredictorSettings:
        return cls(**json.loads(text))


@dataclass
class Prepared:
    """Model-ready rows: patient_id, feature_paths and the model's genes (NaN where absent)."""

    frame: pd.DataFrame
    errors: dict[int, str]
    notes: dict[int, str]


def missing_gene_columns(frame: pd.DataFrame, genes: list[str]) -> list[str]:
    """Genes of the model absent from the input columns (rows with an expression_path don't need them)."""
    if "expression_path" in frame and frame["expression_path"].fillna("").astype(str).str.strip().ne("").all():
        return []
    present = set(map(str, frame.columns))
    return [g for g in genes if g not in present]


def describe_missing(missing: list[str], total: int) -> str:
    shown = ", ".join(missing[:10]) + (f", … ({len(missing) - 10} more)" if len(missing) > 10 else "")
    return f"{len(missing)} of the model's {total} genes are missing from the input: {shown}"


def prepare(frame: pd.DataFrame, settings: PredictorSettings, workdir: Path, *, allow_missing_genes: bool,
            encode: Callable[[list[str], Path], tuple[dict[str, Path], dict[str, str]]] | None) -> Prepared:
    """Resolve each row's expression and tile features; rows that cannot be used get an error.

    `encode(slide_paths, out_dir)` extracts features, returning slide → file and slide → reason.
    """
    frame = frame.reset_index(drop=True)
    errors: dict[int, str] = {}
    notes: dict[int, str] = {}
    out = pd.DataFrame({"patient_id": frame["patient_id"].astype(str)})
    if settings.uses_genes:
        genes = _expression(frame, settings.genes, errors)
        for row, n_missing in enumerate(genes.isna().sum(axis=1).to_numpy()):
            if row in errors or not n_missing:
                continue
            absent = genes.columns[genes.iloc[row].isna().to_numpy()].tolist()
            if n_missing == len(settings.genes):
                errors[row] = "no expression for this patient (no gene columns with values, no expression_path)"
            elif allow_missing_genes:
                notes[row] = f"imputed {n_missing} of {len(settings.genes)} genes with the training mean"
            else:
                errors[row] = describe_missing(absent, len(settings.genes))
        out = pd.concat([out, genes], axis=1)
    out["feature_paths"] = ""
    if settings.uses_tiles:
        out["feature_paths"] = _features(frame, settings, workdir, errors, encode)
    return Prepared(frame=out, errors=errors, notes=notes)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame:
        return pd.Series([""] * len(frame))
    return frame[name].fillna("").astype(str).str.strip()


def _expression(frame: pd.DataFrame, genes: list[str], errors: dict[int, str]) -> pd.DataFrame:
    """Patients × model genes, raw values, from gene columns or each row's expression_path."""
    values = frame.reindex(columns=genes).apply(pd.to_numeric, errors="coerce").astype(np.float64)
    paths = _column(frame, "expression_path")
    patients = frame["patient_id"].astype(str)
    for path, rows in paths[paths != ""].groupby(paths[paths != ""]).groups.items():
        try:
            table = read_sample_expression(Path(path), set(patients[rows]))
        except UserError as exc:
            errors.update({row: str(exc) for row in rows})
            continue
        for row in rows:
            if patients[row] not in table.index:
                errors[row] = f"{path}: no tumour sample of patient {patients[row]}"
            else:
                values.loc[row] = table.loc[patients[row]].reindex(genes).to_numpy(np.float64)
    return values


def read_sample_expression(path: Path, patients: set[str]) -> pd.DataFrame:
    """Patients × genes from a file holding one sample (gene id + value) or a matrix of several."""
    from mmbrca.data.expression import _load_matrix, read_expression

    if not path.is_file():
        raise UserError(f"{path}: expression file not found")
    matrix = _load_matrix(path)
    if matrix.shape[1] == 1 and len(patients) == 1:  # a single sample: gene id, value
        values = pd.to_numeric(matrix.iloc[:, 0], errors="coerce").groupby(level=0, sort=False).mean()
        if values.isna().all():
            raise UserError(f"{path}: expression values are not numeric")
        return pd.DataFrame([values.to_numpy(np.float64)], index=sorted(patients), columns=values.index)
    return read_expression(path, patients, duplicate_genes="mean").values


def _features(frame: pd.DataFrame, settings: PredictorSettings, workdir: Path, errors: dict[int, str],
              encode) -> list[str]:
    """Each row's feature files: given ones (checked against the model's settings) or extracted ones."""
    given, slides = _column(frame, "feature_paths"), _column(frame, "slide_path")
    files: list[str] = [""] * len(frame)
    to_extract: dict[int, list[str]] = {}
    for row in range(len(frame)):
        if row in errors:
            continue
        if given[row]:
            paths = [p.strip() for p in given[row].split(";") if p.strip()]
            problems = [_check_feature_file(p, settings.extraction) for p in paths]
            problem = next((p for p in problems if p), None)
            if problem:
                errors[row] = problem
            else:
                files[row] = ";".join(paths)
        elif slides[row]:
            to_extract[row] = [p.strip() for p in slides[row].split(";") if p.strip()]
        else:
            errors[row] = "no slide_path (or feature_paths): this model needs the patient's slide"
    if not to_extract:
        return files
    if encode is None:
        for row in to_extract:
            errors[row] = "this model has no tile encoder; give feature_paths instead of slide_path"
        return files
    produced, failed = encode(sorted({p for paths in to_extract.values() for p in paths}), workdir)
    for row, paths in to_extract.items():
        reasons = [f"{Path(p).name}: {failed[p]}" for p in paths if p in failed]
        if reasons:
            errors[row] = "slide could not be used: " + "; ".join(reasons)
        else:
            files[row] = ";".join(str(produced[p]) for p in paths)
    return files


def _check_feature_file(path: str, extraction: dict | None) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            params = json.loads(h5.attrs["params"])
    except (OSError, KeyError):
        return f"{path}: not a feature file"
    expected = (extraction or {}).get("params")
    if expected is not None and params != expected:
        differing = sorted(k for k in set(params) | set(expected) if params.get(k) != expected.get(k))
        return (f"{path}: features made with other settings than the model's ("
                + ", ".join(f"{k}={params.get(k)!r} vs {expected.get(k)!r}" for k in differing[:3]) + ")")
    return None


def slide_encoder(settings: PredictorSettings, encoder) -> Callable:
    """`encode(slides, out_dir)` with the model's own encoder and tiling settings."""
    from mmbrca.wsi.extract import ExtractOptions, default_workers, extract_slides
    from mmbrca.wsi.features import feature_file_names

    params = settings.extraction["params"]

    def encode(slides: list[str], out_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
        workers = 0 if len(slides) == 1 else min(default_workers(), len(slides))
        options = ExtractOptions.from_content_params(params, workers=workers)
        result = extract_slides(slides, out_dir, options, progress=False, encoder=(encoder, params["encoder"]))
        names = feature_file_names(slides)
        return {p: out_dir / names[p] for p in result.done + result.cached}, result.failed

    return encode


def output_frame(patients: list[str], probabilities: np.ndarray, classes: list[str], errors: dict[int, str],
                 notes: dict[int, str]) -> pd.DataFrame:
    """patient_id, prob_<class>…, predicted_class, status, message (rows in input order)."""
    out = pd.DataFrame({"patient_id": patients})
    failed = np.array([row in errors for row in range(len(patients))], dtype=bool)
    for i, name in enumerate(classes):
        column = probabilities[:, i].astype(np.float64)
        out[f"prob_{name}"] = np.where(failed, np.nan, column)
    out["predicted_class"] = [None if failed[row] else classes[int(probabilities[row].argmax())]
                              for row in range(len(patients))]
    out["status"] = np.where(failed, STATUS_ERROR, STATUS_OK)
    out["message"] = [errors.get(row, notes.get(row, "")) for row in range(len(patients))]
    return out


def run_members(members: list, prepared: Prepared, n_classes: int, *, impute: bool) -> np.ndarray:
    """Mean class probabilities (N, C) over `members` (FoldModel objects) for the rows without error."""
    good = [row for row in range(len(prepared.frame)) if row not in prepared.errors]
    probabilities = np.zeros((len(prepared.frame), n_classes))
    if good:
        rows = prepared.frame.iloc[good]
        probabilities[good] = np.mean([m.probabilities(rows, impute_missing=impute) for m in members], axis=0)
    return probabilities


def predict_raw(frame: pd.DataFrame, settings: PredictorSettings, members: list, encoder, *,
                allow_missing_genes: bool = False) -> pd.DataFrame:
    """The whole path from raw rows to the output table (used by the registered pyfunc model)."""
    if "patient_id" not in frame:
        raise UserError("input has no patient_id column")
    missing = missing_gene_columns(frame, settings.genes) if settings.uses_genes else []
    if missing and not allow_missing_genes:
        raise UserError(describe_missing(missing, len(settings.genes))
                        + " (set allow_missing_genes to impute them with the training mean)")
    encode = slide_encoder(settings, encoder) if encoder is not None else None
    with tempfile.TemporaryDirectory(prefix="mmbrca-predict-") as tmp:
        prepared = prepare(frame, settings, Path(tmp), allow_missing_genes=allow_missing_genes, encode=encode)
        probabilities = run_members(members, prepared, len(settings.classes), impute=allow_missing_genes)
    return output_frame(prepared.frame["patient_id"].tolist(), probabilities, settings.classes, prepared.errors,
                        prepared.notes)


# ------------------------------------------------------------------------------------------ the CLI side


def cohort_input(cohort_dir: str | os.PathLike, genes: list[str], *, use_features: bool,
                 extraction: dict | None) -> pd.DataFrame:
    """Input rows for every patient of a cohort: its slides (or matching cached features) and expression."""
    import pyarrow.parquet as pq

    from mmbrca.data.bags import feature_files_by_patient
    from mmbrca.data.cohort import load_cohort
    from mmbrca.wsi.extract import extraction_settings

    cohort = load_cohort(cohort_dir)
    table = cohort.table.set_index("patient_id")
    patients = table.index.astype(str).tolist()
    frame = pd.DataFrame({"patient_id": patients,
                          "slide_path": [";".join(p) for p in table["slide_paths"]]})
    if use_features and extraction and (cohort.path / "features" / "manifest.json").is_file() and \
            extraction_settings(cohort.path)["params"] == extraction.get("params"):
        files = feature_files_by_patient(cohort.path, dict(zip(patients, map(list, table["slide_paths"]))))
        frame["feature_paths"] = [";".join(map(str, files.get(p, []))) for p in patients]
    if genes and (cohort.path / "expression.parquet").is_file():  # only the model's genes are read
        available = set(pq.read_schema(cohort.path / "expression.parquet").names)
        present = [g for g in genes if g in available]
        values = cohort.expression(genes=present).reindex(patients).reset_index(drop=True).astype(np.float64)
        frame = pd.concat([frame, values], axis=1)
    frame["true_class"] = table["class_name"].to_numpy()
    frame["fold"] = cohort.folds.reindex(patients).to_numpy()
    return frame


def files_input(expression: Path | None, slides_dir: Path | None, genes: list[str], *,
                orientation: str = "auto", duplicate_genes: str = "error") -> tuple[pd.DataFrame, list[str]]:
    """Input rows from an expression matrix and/or a slide directory (matched by barcode prefix).

    Patients are those of the expression matrix when given (their slides are looked up), else one
    per slide's patient barcode (or file stem). Returns the rows and lines saying what was skipped.
    """
    from mmbrca.data.barcodes import parse_barcode
    from mmbrca.data.expression import read_expression
    from mmbrca.data.slides import find_slides, match_slides

    if expression is None and slides_dir is None:
        raise UserError("give --cohort, or --expression and/or --slides")
    report: list[str] = []
    values = None
    if expression is not None and not genes:
        raise UserError(f"--expression {expression}: this model uses no expression; give --slides only")
    if expression is not None:
        values = read_expression(expression, None, orientation=orientation, duplicate_genes=duplicate_genes,
                                 genes=set(genes)).values
        values = values[[g for g in genes if g in values.columns]]  # genes the model does not use are ignored
        patients = values.index.astype(str).tolist()
    slide_paths: dict[str, list[str]] = {}
    if slides_dir is not None:
        found = find_slides(slides_dir)
        if expression is None:
            patients = sorted({parse_barcode(p.name.split(".")[0]).patient if parse_barcode(p.name).is_tcga
                               else p.stem for p in found})
        slide_paths, dropped = match_slides(found, set(patients))
        unreadable = [d for d in dropped if d["patient_id"] in set(patients) and d["reason"].startswith("not a format")]
        for item in unreadable:  # the patient's row reports what the reader says about it
            slide_paths.setdefault(item["patient_id"], []).append(item["id"])
        dropped = [{**d, "reason": "no patient of the expression matches the slide name"}
                   if d["reason"].startswith("no labelled patient") else d for d in dropped if d not in unreadable]
        if dropped:
            report.append(f"{len(dropped)} slide(s) not used: " + "; ".join(
                f"{Path(d['id']).name} ({d['reason']})" for d in dropped[:5]) + (" …" if len(dropped) > 5 else ""))
    frame = pd.DataFrame({"patient_id": patients, "slide_path": [";".join(slide_paths.get(p, [])) for p in patients]})
    if values is not None:
        frame = pd.concat([frame, values.reset_index(drop=True).astype(np.float64)], axis=1)
    return frame, report


def predict_in_chunks(model, frame: pd.DataFrame, *, params: dict | None, chunk_size: int = 8,
                      progress: bool = True, bar=None) -> pd.DataFrame:
    """model.predict over `chunk_size` patients at a time, with a progress bar over patients
    (its own, or `bar` shared with other calls)."""
    from tqdm import tqdm

    shown = bar if bar is not None else tqdm(total=len(frame), desc="predict", unit="patient", disable=not progress)
    parts = []
    try:
        for start in range(0, len(frame), chunk_size):
            part = frame.iloc[start:start + chunk_size]
            parts.append(model.predict(part, params=params) if params else model.predict(part))
            shown.update(len(part))
    finally:
        if bar is None:
            shown.close()
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def predict_out_of_fold(model, frame: pd.DataFrame, row_folds: pd.Series, settings: PredictorSettings, *,
                        params: dict | None, chunk_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """Each training-cohort patient predicted by the fold model that did not train on it.

    `row_folds[i]` is row i's test fold; rows of a fold the model holds no member for get an error.
    """
    from tqdm import tqdm

    frame, row_folds = frame.reset_index(drop=True), pd.Series(row_folds).reset_index(drop=True)
    parts = []
    with tqdm(total=len(frame), desc="predict", unit="patient", disable=not progress) as bar:
        for fold in settings.folds:
            rows = frame.index[row_folds == fold]
            if len(rows):
                part = predict_in_chunks(model, frame.loc[rows], params={**(params or {}), "fold": fold},
                                         chunk_size=chunk_size, bar=bar)
                parts.append(part.set_axis(rows))
    orphans = frame.index.difference(pd.Index([i for part in parts for i in part.index]))
    if len(orphans):
        errors = {i: f"fold {row_folds[orphans[i]]} has no model (the model holds folds {settings.folds})"
                  for i in range(len(orphans))}
        parts.append(output_frame(frame.loc[orphans, "patient_id"].tolist(), np.zeros((len(orphans),
                                  len(settings.classes))), settings.classes, errors, {}).set_axis(orphans))
    return pd.concat(parts).sort_index()

