"""Reading a gene-expression matrix in any orientation and resolving it to one tumour sample per patient."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mmbrca.data.barcodes import parse_barcode, tumour_sample_rank
from mmbrca.errors import UserError
from mmbrca.io import read_table

Orientation = Literal["auto", "genes-by-samples", "samples-by-genes"]
DuplicateGenes = Literal["error", "mean", "first"]
ORIENTATIONS = ("auto", "genes-by-samples", "samples-by-genes")
DUPLICATE_GENE_RULES = ("error", "mean", "first")
REPLICATE_RULE = ("primary tumour (01) first, then the lowest tumour sample type, then vial A before B, "
                  "then the smallest barcode")


@dataclass
class Expression:
    """Patients × genes (float32, raw values as given), with the sample chosen for each patient."""

    values: pd.DataFrame  # index: patient_id, columns: gene ids
    sample_of: dict[str, str]  # patient_id → chosen sample id
    dropped: list[dict] = field(default_factory=list)  # rows for dropped.csv
    orientation: str = "genes-by-samples"


def _load_matrix(path: Path) -> pd.DataFrame:
    frame = read_table(path, what="expression", index_col=0, low_memory=False)
    columns = set(map(str, frame.columns))
    for column in frame.columns:  # pandas renames a repeated header X to X.1; report the repeat instead
        base, dot, number = str(column).rpartition(".")
        if dot and number.isdigit() and base in columns:
            raise UserError(f"{path}: column {base!r} appears more than once")
    if isinstance(frame.index, pd.RangeIndex) and len(frame.columns) and not pd.api.types.is_numeric_dtype(frame.dtypes.iloc[0]):
        frame = frame.set_index(frame.columns[0])  # Parquet written without an index
    # Firehose/TCGA "data.txt" files carry a second header row: gene_id | normalized_count | ...
    if len(frame) and str(frame.index[0]).strip().casefold() in {"gene_id", "gene", "composite element ref"}:
        frame = frame.iloc[1:]
    frame.index = frame.index.map(str).str.strip()
    frame.columns = frame.columns.map(str).str.strip()
    if frame.empty:
        raise UserError(f"{path}: expression table has no values")
    return frame


def _overlap(ids: pd.Index, patients: set[str]) -> int:
    return sum(parse_barcode(i).patient in patients for i in ids)


def _orient(frame: pd.DataFrame, orientation: Orientation, patients: set[str] | None, path: Path,
            genes: set[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Return samples × genes. 'auto' picks the axis whose ids match more labelled patients, or, with
    no patients given, the axis holding more of `genes`."""
    if orientation not in ORIENTATIONS:
        raise UserError(f"--orientation: expected one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    if orientation == "auto" and patients is None:
        genes = genes or set()
        in_rows, in_columns = len(genes & set(frame.index)), len(genes & set(frame.columns))
        if not in_rows and not in_columns:
            raise UserError(f"{path}: no row or column id is a gene of the model (ids start "
                            f"{list(frame.index[:2])} and {list(frame.columns[:2])})")
        orientation = "genes-by-samples" if in_rows >= in_columns else "samples-by-genes"
    elif orientation == "auto":
        by_columns, by_rows = _overlap(frame.columns, patients), _overlap(frame.index, patients)
        orientation = "genes-by-samples" if by_columns >= by_rows else "samples-by-genes"
    oriented = frame.T if orientation == "genes-by-samples" else frame
    if patients is not None and _overlap(oriented.index, patients) == 0:
        axis = "column" if orientation == "genes-by-samples" else "row"
        raise UserError(f"{path}: no expression sample id matches a labelled patient ({orientation}: {axis} ids "
                        f"start {list(oriented.index[:2])}; labels start {sorted(patients)[:2]})")
    oriented.index.name, oriented.columns.name = "sample_id", "gene_id"
    return oriented, orientation


def _to_numeric(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    if all(pd.api.types.is_numeric_dtype(t) for t in frame.dtypes):
        return frame.astype(np.float64)
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & frame.notna()
    if not bad.to_numpy().any():
        return numeric.astype(np.float64)
    sample, gene = bad.stack().loc[lambda s: s].index[0]
    raise UserError(f"{path}: non-numeric expression value {frame.at[sample, gene]!r} for gene {gene!r} in sample {sample!r}")


def _check_finite(frame: pd.DataFrame, path: Path) -> None:
    values = frame.to_numpy()
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    rows, cols = np.nonzero(bad)
    genes = list(dict.fromkeys(frame.columns[cols]))[:3]
    samples = list(dict.fromkeys(frame.index[rows]))[:3]
    raise UserError(f"{path}: {int(bad.sum())} NaN or infinite expression values, e.g. gene(s) {genes} "
                    f"in sample(s) {samples}")


def _merge_duplicate_genes(frame: pd.DataFrame, rule: DuplicateGenes, path: Path) -> pd.DataFrame:
    duplicated = frame.columns[frame.columns.duplicated()].unique()
    if len(duplicated) == 0:
        return frame
    if rule == "error":
        raise UserError(f"{path}: {len(duplicated)} duplicate gene ids, e.g. {list(duplicated[:3])}; "
                        "merge them with --duplicate-genes mean|first")
    if rule == "first":
        return frame.loc[:, ~frame.columns.duplicated()]
    if rule == "mean":
        return frame.T.groupby(level=0, sort=False).mean().T
    raise UserError(f"--duplicate-genes: expected one of {', '.join(DUPLICATE_GENE_RULES)}, got {rule!r}")


def _choose_samples(sample_ids: pd.Index) -> tuple[dict[str, str], list[dict]]:
    """One tumour sample per patient (REPLICATE_RULE); normals and controls are dropped."""
    dropped: list[dict] = []
    candidates: dict[str, list] = {}
    for sample in sample_ids:
        barcode = parse_barcode(sample)
        if not barcode.is_tumour:
            dropped.append({"kind": "sample", "id": sample, "patient_id": barcode.patient,
                            "reason": f"{barcode.describe_type()} sample, not used as tumour"})
            continue
        candidates.setdefault(barcode.patient, []).append(barcode)
    chosen: dict[str, str] = {}
    for patient, barcodes in candidates.items():
        keep, *rest = sorted(barcodes, key=tumour_sample_rank)
        chosen[patient] = keep.raw
        dropped.extend({"kind": "sample", "id": b.raw, "patient_id": patient,
                        "reason": f"replicate tumour sample; kept {keep.raw}"} for b in rest)
    return chosen, dropped


def read_expression(path: str | os.PathLike, labelled_patients: set[str] | None, *, orientation: Orientation = "auto",
                    duplicate_genes: DuplicateGenes = "error", genes: set[str] | None = None) -> Expression:
    """Read, orient, validate and resolve an expression matrix (CSV/TSV/Parquet).

    Validation is strict: non-numeric, NaN or infinite values and duplicate sample ids are errors;
    duplicate gene ids follow `duplicate_genes`. `labelled_patients` None (new patients to predict)
    orients the matrix by the model's `genes` instead.
    """
    path = Path(path)
    if duplicate_genes not in DUPLICATE_GENE_RULES:
        raise UserError(f"--duplicate-genes: expected one of {', '.join(DUPLICATE_GENE_RULES)}, got {duplicate_genes!r}")
    frame, orientation = _orient(_load_matrix(path), orientation, labelled_patients, path, genes)
    if frame.index.has_duplicates:
        raise UserError(f"{path}: duplicate sample id {frame.index[frame.index.duplicated()][0]!r}")
    frame = _to_numeric(frame, path)
    _check_finite(frame, path)
    frame = _merge_duplicate_genes(frame, duplicate_genes, path)
    chosen, dropped = _choose_samples(frame.index)
    values = frame.loc[list(chosen.values())].astype(np.float32)
    values.index = pd.Index(list(chosen.keys()), name="patient_id")
    return Expression(values=values, sample_of=chosen, dropped=dropped, orientation=orientation)
