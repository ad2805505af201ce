"""Finding whole-slide images and matching them to patients by barcode prefix."""

from __future__ import annotations

import os
from pathlib import Path

import openslide

from mmbrca.data.barcodes import parse_barcode
from mmbrca.errors import UserError

# Formats OpenSlide reads (https://openslide.org/formats/).
SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                            ".bif", ".dcm", ".czi"})
_SEPARATORS = ("-", "_", ".", " ")


def find_slides(directory: str | os.PathLike) -> list[Path]:
    """Every slide file under `directory`, recursively (GDC downloads put each slide in its own folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: slides directory not found")
    return sorted(p.resolve() for p in directory.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())


def slide_patient(path: Path, patients: set[str]) -> str | None:
    """The patient a slide belongs to: its TCGA patient barcode, or the patient id its name starts with.

    A non-TCGA name matches a patient id when it equals it or continues with a separator
    (`P1_HE.svs` is P1's, `P10.svs` is not).
    """
    name = path.name.split(".")[0] if parse_barcode(path.name).is_tcga else path.stem
    barcode = parse_barcode(name)
    if barcode.is_tcga:
        return barcode.patient if barcode.patient in patients else None
    matches = [p for p in patients if name == p or any(name.startswith(p + sep) for sep in _SEPARATORS)]
    return max(matches, key=len) if matches else None


def match_slides(paths: list[Path], patients: set[str]) -> tuple[dict[str, list[str]], list[dict]]:
    """Patient → slide paths; slides that are not usable tumour slides go to the dropped list."""
    by_patient: dict[str, list[str]] = {}
    dropped: list[dict] = []
    for path in paths:
        barcode = parse_barcode(path.name.split(".")[0])
        patient = slide_patient(path, patients)
        reason = None
        if barcode.is_tcga and not barcode.is_tumour:
            reason = f"{barcode.describe_type()} slide, not used as tumour"
        elif patient is None:
            reason = "no labelled patient matches the slide name"
        elif openslide.OpenSlide.detect_format(str(path)) is None:
            reason = "not a format OpenSlide can read"
        if reason is not None:
            dropped.append({"kind": "slide", "id": str(path), "patient_id": patient or barcode.patient, "reason": reason})
            continue
        by_patient.setdefault(patient, []).append(str(path))
    return by_patient, dropped
