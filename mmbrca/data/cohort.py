"""Building and reading a cohort directory: the unit every later step consumes.

COHORT/
  cohort.json       manifest: classes, label map, split, counts, fingerprint, inputs
  cohort.parquet    one row per kept patient
  expression.parquet  kept patients with expression × genes, raw values (float32)
  folds.csv         patient_id, fold (0..K-1)
  dropped.csv       kind (patient|sample|slide), id, patient_id, reason
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mmbrca import __version__
from mmbrca.data.barcodes import parse_barcode
from mmbrca.data.expression import REPLICATE_RULE, DuplicateGenes, Expression, Orientation, read_expression
from mmbrca.data.folds import UNKNOWN_SITE, Split, make_folds
from mmbrca.data.labels import LabelMap, read_labels
from mmbrca.data.slides import find_slides, match_slides
from mmbrca.errors import UserError
from mmbrca.io import publish_dir, sha256_file, staging_dir

FORMAT = "mmbrca-cohort"
FORMAT_VERSION = 1
COHORT_COLUMNS = ["patient_id", "raw_label", "class_index", "class_name", "site", "expression_sample",
                  "slide_paths", "n_slides", "has_expression", "has_slide"]
DROPPED_COLUMNS = ["kind", "id", "patient_id", "reason"]


@dataclass(frozen=True)
class CohortOptions:
    """Everything that decides the content of a cohort besides its input files."""

    label_map: LabelMap
    id_column: str | None = None
    label_column: str | None = None
    site_column: str | None = None
    orientation: Orientation = "auto"
    duplicate_genes: DuplicateGenes = "error"
    n_folds: int = 5
    split: Split = "stratified"
    seed: int = 0


@dataclass(frozen=True)
class BuildResult:
    path: Path
    table: pd.DataFrame
    folds: pd.Series
    dropped: pd.DataFrame
    manifest: dict
    up_to_date: bool  # the directory already held this very cohort


def _patient_table(labels: pd.DataFrame, expression: Expression | None, slides: dict[str, list[str]],
                   label_map: LabelMap) -> tuple[pd.DataFrame, list[dict]]:
    """Join labels, expression and slides; return kept patients and patient-level drops."""
    with_expression = set(expression.values.index) if expression is not None else set()
    labelled = set(labels["patient_id"])
    dropped = [{"kind": "patient", "id": p, "patient_id": p, "reason": "no label (not in the labels file)"}
               for p in sorted((with_expression | set(slides)) - labelled)]
    rows = []
    for rec in labels.sort_values("patient_id").itertuples(index=False):
        reason = None
        if rec.raw_label is None:
            reason = "missing label"
        elif rec.class_name is None:
            reason = f"label {rec.raw_label!r} is dropped by the label map"
        elif rec.patient_id not in with_expression and rec.patient_id not in slides:
            reason = "no expression sample and no slide"
        if reason is not None:
            dropped.append({"kind": "patient", "id": rec.patient_id, "patient_id": rec.patient_id, "reason": reason})
            continue
        paths = sorted(slides.get(rec.patient_id, []))
        rows.append({
            "patient_id": rec.patient_id,
            "raw_label": rec.raw_label,
            "class_index": label_map.classes.index(rec.class_name),
            "class_name": rec.class_name,
            "site": rec.site,
            "expression_sample": expression.sample_of.get(rec.patient_id) if expression is not None else None,
            "slide_paths": paths,
            "n_slides": len(paths),
            "has_expression": rec.patient_id in with_expression,
            "has_slide": bool(paths),
        })
    return pd.DataFrame(rows, columns=COHORT_COLUMNS), dropped


def _fingerprint(table: pd.DataFrame, folds: pd.Series, expression: pd.DataFrame | None, manifest: dict) -> str:
    """Content hash of a cohort: same inputs and options → same fingerprint."""
    digest = hashlib.sha256()
    digest.update(table.assign(slide_paths=table["slide_paths"].map("|".join)).to_csv(index=False).encode())
    digest.update(folds.to_csv().encode())
    if expression is not None:
        digest.update("\t".join(expression.columns).encode())
        digest.update(np.ascontiguousarray(expression.to_numpy(np.float32)).tobytes())
    digest.update(json.dumps({k: manifest[k] for k in ("classes", "label_map", "split")}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _write(directory: Path, table: pd.DataFrame, folds: pd.Series, expression: pd.DataFrame | None,
           dropped: pd.DataFrame, manifest: dict) -> None:
    table.to_parquet(directory / "cohort.parquet", index=False)
    folds.rename_axis("patient_id").reset_index().to_csv(directory / "folds.csv", index=False)
    dropped.to_csv(directory / "dropped.csv", index=False)
    if expression is not None:
        expression.to_parquet(directory / "expression.parquet")
    (directory / "cohort.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _check_destination(out: Path, fingerprint: str) -> bool:
    """True if `out` already holds this cohort; error if it holds anything else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    manifest_path = out / "cohort.json"
    if not manifest_path.is_file():
        raise UserError(f"{out}: output directory exists and is not a cohort directory; choose another or remove it")
    try:
        existing = json.loads(manifest_path.read_text()).get("fingerprint")
    except (OSError, ValueError):
        existing = None
    if existing != fingerprint:
        raise UserError(f"{out}: already holds a different cohort (fingerprint {existing}, new {fingerprint}); "
                        "choose another directory or remove it")
    return True


def build_cohort(out: str | os.PathLike, *, expression_path: str | os.PathLike | None,
                 labels_path: str | os.PathLike, slides_dir: str | os.PathLike | None,
                 options: CohortOptions) -> BuildResult:
    """Validate raw inputs and write the cohort directory atomically (all or nothing)."""
    out = Path(out)
    if expression_path is None and slides_dir is None:
        raise UserError("give --expression, --slides or both")
    label_map = options.label_map
    labels = read_labels(labels_path, label_map, id_column=options.id_column, label_column=options.label_column,
                         site_column=options.site_column)
    labelled = set(labels["patient_id"])
    expression = None
    if expression_path is not None:
        expression = read_expression(expression_path, labelled, orientation=options.orientation,
                                     duplicate_genes=options.duplicate_genes)
    slides, slide_drops = match_slides(find_slides(slides_dir), labelled) if slides_dir is not None else ({}, [])

    table, patient_drops = _patient_table(labels, expression, slides, label_map)
    table["site"] = _sites(table, options.site_column)
    by_patient = table.set_index("patient_id")
    modalities = by_patient["has_expression"].map({True: "expr", False: "-"}) + by_patient["has_slide"].map(
        {True: "+slide", False: ""})
    folds = make_folds(by_patient["class_name"], by_patient["site"], options.n_folds, options.split, options.seed,
                       strata=modalities)
    kept_expression = None
    if expression is not None:
        kept_expression = expression.values.loc[table.loc[table["has_expression"], "patient_id"]]
    sample_drops = expression.dropped if expression is not None else []
    dropped = pd.DataFrame(patient_drops + sample_drops + slide_drops, columns=DROPPED_COLUMNS)

    manifest = _manifest(table, folds, kept_expression, label_map, options, expression, expression_path,
                         labels_path, slides_dir)
    up_to_date = _check_destination(out, manifest["fingerprint"])
    if not up_to_date:
        with staging_dir(out) as staged:
            _write(staged, table, folds, kept_expression, dropped, manifest)
            publish_dir(staged, out)
    return BuildResult(path=out, table=table, folds=folds, dropped=dropped, manifest=manifest, up_to_date=up_to_date)


def _sites(table: pd.DataFrame, site_column: str | None) -> pd.Series:
    """Site column value if given, else the TCGA tissue source site, else 'unknown'."""
    barcode_sites = table["patient_id"].map(lambda p: parse_barcode(p).site)
    given = table["site"] if site_column else pd.Series(None, index=table.index, dtype=object)
    return given.where(given.notna(), barcode_sites).fillna(UNKNOWN_SITE).astype(str)


def _manifest(table, folds, expression, label_map, options, full_expression, expression_path, labels_path,
              slides_dir) -> dict:
    def file_info(path):
        return None if path is None else {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mmbrca_version": __version__,
        "classes": list(label_map.classes),
        "positive_class": label_map.positive_class,
        "label_map": label_map.to_dict(),
        "split": {"method": options.split, "n_folds": options.n_folds, "seed": options.seed},
        "expression": None if expression is None else {
            "n_genes": int(expression.shape[1]),
            "orientation_detected": full_expression.orientation,
            "duplicate_genes": options.duplicate_genes,
            "replicate_rule": REPLICATE_RULE,
            "min": float(expression.to_numpy().min()) if expression.size else None,
            "max": float(expression.to_numpy().max()) if expression.size else None,
        },
        "counts": {
            "patients": int(len(table)),
            "with_expression": int(table["has_expression"].sum()),
            "with_slide": int(table["has_slide"].sum()),
            "slides": int(table["n_slides"].sum()),
            "per_class": {k: int(v) for k, v in table["class_name"].value_counts().sort_index().items()},
            "per_site": {k: int(v) for k, v in table["site"].value_counts().sort_index().items()},
        },
        "inputs": {
            "expression": file_info(expression_path),
            "labels": file_info(labels_path),
            "slides_dir": None if slides_dir is None else str(Path(slides_dir).resolve()),
            "id_column": options.id_column,
            "label_column": options.label_column,
            "site_column": options.site_column,
        },
    }
    manifest["fingerprint"] = _fingerprint(table, folds, expression, manifest)
    return manifest


@dataclass(frozen=True)
class Cohort:
    """A cohort directory opened for reading."""

    path: Path
    manifest: dict
    table: pd.DataFrame
    folds: pd.Series

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def n_folds(self) -> int:
        return int(self.manifest["split"]["n_folds"])

    def expression(self, genes: list[str] | None = None) -> pd.DataFrame:
        """Patients × genes (raw values); reads only the requested genes."""
        path = self.path / "expression.parquet"
        if not path.is_file():
            raise UserError(f"{self.path}: cohort has no expression (it was built without --expression)")
        return pd.read_parquet(path, columns=genes)


def load_cohort(path: str | os.PathLike) -> Cohort:
    path = Path(path)
    manifest_path = path / "cohort.json"
    if not manifest_path.is_file():
        raise UserError(f"{path}: not a cohort directory (no cohort.json); build one with `mmbrca cohort`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{manifest_path}: unsupported cohort format {manifest.get('format')!r} "
                        f"version {manifest.get('format_version')!r}")
    table = pd.read_parquet(path / "cohort.parquet")
    folds = pd.read_csv(path / "folds.csv", dtype={"patient_id": str}).set_index("patient_id")["fold"]
    return Cohort(path=path, manifest=manifest, table=table, folds=folds)
