"""TCGA barcodes: patient, tissue source site and sample type from an id such as
``TCGA-A2-A0T2-01A-11R-A084-07`` (sample) or ``TCGA-A2-A0T2-01Z-00-DX1`` (slide).

Non-TCGA ids are accepted as they are: the id is the patient, site and sample type are unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# TCGA-<TSS>-<participant>[-<sample type><vial>[-...]]
_TCGA = re.compile(r"^(TCGA-([A-Z0-9]{2})-([A-Z0-9]{4}))(?:-(\d{2})([A-Z])?)?", re.IGNORECASE)

# https://gdc.cancer.gov/resources-tcga-users/tcga-code-tables/sample-type-codes
TUMOUR_TYPES = range(1, 10)  # 01 primary solid tumour ... 09 primary blood cancer (bone marrow)
NORMAL_TYPES = range(10, 20)  # 10 blood normal, 11 solid tissue normal, ... 14 bone marrow normal
PRIMARY_TUMOUR = 1


@dataclass(frozen=True)
class Barcode:
    """A parsed sample, slide or patient id."""

    raw: str
    patient: str
    site: str | None = None
    sample_type: int | None = None
    vial: str | None = None

    @property
    def is_tcga(self) -> bool:
        return self.site is not None

    @property
    def is_normal(self) -> bool:
        """Normal tissue or blood (sample types 10-19): never used as tumour."""
        return self.sample_type is not None and self.sample_type in NORMAL_TYPES

    @property
    def is_tumour(self) -> bool:
        """A tumour sample, or an id that does not say (a patient barcode or a non-TCGA id)."""
        return self.sample_type is None or self.sample_type in TUMOUR_TYPES

    def describe_type(self) -> str:
        if self.sample_type is None:
            return "unknown"
        if self.is_normal:
            return f"normal tissue (type {self.sample_type:02d})"
        if self.is_tumour:
            return f"tumour (type {self.sample_type:02d})"
        return f"control or other (type {self.sample_type:02d})"


def parse_barcode(raw: str) -> Barcode:
    """Parse a TCGA barcode (case-insensitive, upper-cased); any other id is its own patient."""
    text = str(raw).strip()
    match = _TCGA.match(text)
    if match is None:
        return Barcode(raw=text, patient=text)
    patient, site, _participant, sample, vial = match.groups()
    return Barcode(
        raw=text,
        patient=patient.upper(),
        site=site.upper(),
        sample_type=int(sample) if sample is not None else None,
        vial=vial.upper() if vial else None,
    )


def tumour_sample_rank(barcode: Barcode) -> tuple:
    """Sort key choosing one tumour sample when a patient has several (smallest first).

    The documented rule: primary tumour (type 01) first, then the lowest other tumour type, then
    vial A before B, then the lexicographically smallest full barcode (a stable tie-break).
    """
    sample_type = barcode.sample_type if barcode.sample_type is not None else PRIMARY_TUMOUR
    return (sample_type, barcode.vial or "", barcode.raw)
