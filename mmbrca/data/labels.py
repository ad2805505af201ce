"""Label maps (raw subtype → class) and reading the label table."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mmbrca.data.barcodes import parse_barcode
from mmbrca.errors import UserError
from mmbrca.io import read_table, read_yaml_mapping

# Values that mean "no label" in TCGA-style clinical tables.
MISSING_LABELS = frozenset({"", "na", "nan", "n/a", "none", "null", "[not available]", "[not applicable]",
                            "[unknown]", "[not evaluated]", "[discrepancy]"})
ID_COLUMNS = ("patient_id", "bcr_patient_barcode", "patient", "case_submitter_id", "submitter_id",
              "sample", "sample_id", "barcode", "id")
LABEL_COLUMNS = ("subtype", "pam50", "PAM50Call_RNAseq", "Subtype_mRNA", "BRCA_Subtype_PAM50",
                 "label", "class")
_PREFIX = re.compile(r"^BRCA[._]", re.IGNORECASE)


def _key(raw: str) -> str:
    """Lookup key: `BRCA.LumA`, `BRCA_LumA`, `LumA` and `luma` are the same subtype."""
    return _PREFIX.sub("", str(raw).strip()).casefold()


@dataclass(frozen=True)
class LabelMap:
    """Raw subtype labels → classes. The last class is the positive class (PR-AUC, F1)."""

    classes: tuple[str, ...]
    mapping: dict[str, str]
    drop: tuple[str, ...] = ()
    _lookup: dict[str, str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        source = "label map"
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise UserError(f"{source}: 'classes' needs at least two distinct names, got {list(self.classes)}")
        lookup: dict[str, str | None] = {}
        for raw, cls in self.mapping.items():
            if cls not in self.classes:
                raise UserError(f"{source}: 'map' sends {raw!r} to {cls!r}, which is not in classes {list(self.classes)}")
            self._add(lookup, raw, cls)
        for raw in self.drop:
            self._add(lookup, raw, None)
        object.__setattr__(self, "_lookup", lookup)

    @staticmethod
    def _add(lookup: dict[str, str | None], raw: str, target: str | None) -> None:
        key = _key(raw)
        if key in lookup and lookup[key] != target:
            raise UserError(f"label map: {raw!r} is given two targets: {lookup[key]!r} and {target!r}")
        lookup[key] = target

    @classmethod
    def default(cls) -> LabelMap:
        """PAM50 → Luminal vs Basal/Her2; Normal-like dropped. Bare and `BRCA.`-prefixed values both map."""
        return cls(
            classes=("Luminal", "Basal/Her2"),
            mapping={"BRCA.LumA": "Luminal", "BRCA.LumB": "Luminal",
                     "BRCA.Basal": "Basal/Her2", "BRCA.Her2": "Basal/Her2"},
            drop=("BRCA.Normal",),
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> LabelMap:
        path = Path(path)
        _, data = read_yaml_mapping(path, what="label map")
        unknown = set(data) - {"classes", "map", "drop"}
        if unknown:
            raise UserError(f"{path}: unknown key {sorted(unknown)[0]!r}; expected classes, map, drop")
        classes, mapping, drop = data.get("classes"), data.get("map"), data.get("drop") or []
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{path}: 'classes' must be a list of names, got {classes!r}")
        if not isinstance(mapping, dict) or not mapping:
            raise UserError(f"{path}: 'map' must be a non-empty mapping raw label → class, got {mapping!r}")
        if not isinstance(drop, list):
            raise UserError(f"{path}: 'drop' must be a list of raw labels, got {drop!r}")
        try:
            return cls(classes=tuple(classes), mapping={str(k): str(v) for k, v in mapping.items()},
                       drop=tuple(str(d) for d in drop))
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    @property
    def positive_class(self) -> str:
        return self.classes[-1]

    def is_known(self, raw: str) -> bool:
        return _key(raw) in self._lookup

    def resolve(self, raw: str) -> str | None:
        """The class of a raw label, or None if the map drops it. Unknown labels raise KeyError."""
        return self._lookup[_key(raw)]

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "map": dict(self.mapping), "drop": list(self.drop)}


def is_missing_label(value: object) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or str(value).strip().casefold() in MISSING_LABELS


def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], *, path: Path,
                 option: str, fallback_first: bool) -> str:
    if given is not None:
        if given not in columns:
            raise UserError(f"{path}: no column {given!r} ({option}); columns are {columns}")
        return given
    folded = {c.casefold(): c for c in columns}
    for name in candidates:
        if name.casefold() in folded:
            return folded[name.casefold()]
    if fallback_first:
        return columns[0]
    raise UserError(f"{path}: cannot tell which column holds the labels; pass {option} (columns are {columns})")


def read_labels(path: str | os.PathLike, label_map: LabelMap, *, id_column: str | None = None,
                label_column: str | None = None, site_column: str | None = None) -> pd.DataFrame:
    """One row per patient: patient_id, raw_label (None if missing), class_name (None if dropped), site.

    Rows are validated in file order; errors name the file, row (1-based, header = row 1),
    column and value. A patient listed twice with the same label is fine; with different
    labels it is an error.
    """
    path = Path(path)
    table = read_table(path, what="labels", dtype=str, keep_default_na=False)
    columns = [str(c) for c in table.columns]
    if table.empty:
        raise UserError(f"{path}: labels file has no rows")
    id_col = _pick_column(columns, id_column, ID_COLUMNS, path=path, option="--id-column", fallback_first=True)
    label_col = _pick_column([c for c in columns if c != id_col], label_column, LABEL_COLUMNS, path=path,
                             option="--label-column", fallback_first=False)
    if site_column is not None and site_column not in columns:
        raise UserError(f"{path}: no column {site_column!r} (--site-column); columns are {columns}")

    records: dict[str, dict] = {}
    for row_number, row in enumerate(table.itertuples(index=False), start=2):
        values = dict(zip(columns, row))
        raw_id = str(values[id_col]).strip()
        if not raw_id:
            raise UserError(f"{path}: row {row_number}, column {id_col!r}: empty patient id")
        raw_label = values[label_col]
        raw_label = None if is_missing_label(raw_label) else str(raw_label).strip()
        if raw_label is not None and not label_map.is_known(raw_label):
            known = sorted(set(label_map.mapping) | set(label_map.drop))
            raise UserError(f"{path}: row {row_number}, column {label_col!r}: label {raw_label!r} is not in the "
                            f"label map (known: {', '.join(known)}; add it with --label-map)")
        patient = parse_barcode(raw_id).patient
        site = str(values[site_column]).strip() or None if site_column else None
        previous = records.get(patient)
        if previous is not None:
            if previous["raw_label"] != raw_label and None not in (previous["raw_label"], raw_label):
                raise UserError(f"{path}: row {row_number}, column {label_col!r}: patient {patient} has conflicting "
                                f"labels {previous['raw_label']!r} (row {previous['row']}) and {raw_label!r}")
            if raw_label is None:
                continue
        records[patient] = {"patient_id": patient, "raw_label": raw_label, "site": site, "row": row_number,
                            "class_name": label_map.resolve(raw_label) if raw_label is not None else None}

    columns = ["patient_id", "raw_label", "site", "class_name"]
    frame = pd.DataFrame([[r[c] for c in columns] for r in records.values()], columns=columns, dtype=object)
    return frame.where(frame.notna(), None)
