import pytest

from mmbrca.data.barcodes import parse_barcode, tumour_sample_rank


@pytest.mark.parametrize(
    ("raw", "patient", "site", "sample_type", "vial"),
    [
        ("TCGA-A2-A0T2-01A-11R-A084-07", "TCGA-A2-A0T2", "A2", 1, "A"),
        ("TCGA-A2-A0T2-11A-11R-A084-07", "TCGA-A2-A0T2", "A2", 11, "A"),
        ("TCGA-E2-A1B5-01Z-00-DX1.3D2A1C4B-0000.svs", "TCGA-E2-A1B5", "E2", 1, "Z"),
        ("tcga-bh-a0bz-06a", "TCGA-BH-A0BZ", "BH", 6, "A"),
        ("TCGA-BH-A0BZ", "TCGA-BH-A0BZ", "BH", None, None),
        ("TCGA-BH-A0BZ-01", "TCGA-BH-A0BZ", "BH", 1, None),
        ("PATIENT_0042", "PATIENT_0042", None, None, None),
    ],
)
def test_parse(raw, patient, site, sample_type, vial):
    barcode = parse_barcode(raw)
    assert (barcode.patient, barcode.site, barcode.sample_type, barcode.vial) == (patient, site, sample_type, vial)
    assert barcode.is_tcga == (site is not None)


@pytest.mark.parametrize(("code", "tumour", "normal"), [("01", True, False), ("06", True, False),
                                                         ("10", False, True), ("11", False, True),
                                                         ("19", False, True), ("20", False, False),
                                                         ("50", False, False)])
def test_sample_type_classes(code, tumour, normal):
    barcode = parse_barcode(f"TCGA-A2-A0T2-{code}A")
    assert barcode.is_tumour is tumour
    assert barcode.is_normal is normal


def test_non_tcga_and_patient_ids_count_as_tumour():
    assert parse_barcode("P1").is_tumour and not parse_barcode("P1").is_normal
    assert parse_barcode("TCGA-A2-A0T2").is_tumour


def test_replicate_rule_prefers_primary_then_vial_then_barcode():
    samples = ["TCGA-A2-A0T2-06A-11R-A1", "TCGA-A2-A0T2-01B-11R-A1", "TCGA-A2-A0T2-01A-12R-A2",
               "TCGA-A2-A0T2-01A-11R-A9"]
    ranked = sorted((parse_barcode(s) for s in samples), key=tumour_sample_rank)
    assert [b.raw for b in ranked] == ["TCGA-A2-A0T2-01A-11R-A9", "TCGA-A2-A0T2-01A-12R-A2",
                                       "TCGA-A2-A0T2-01B-11R-A1", "TCGA-A2-A0T2-06A-11R-A1"]
