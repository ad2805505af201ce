"""Building a cohort from the demo raw files, checked against the raw files themselves."""

import json
import os
import shutil

import pandas as pd
import pytest

from mmbrca.data.barcodes import parse_barcode
from mmbrca.data.cohort import COHORT_COLUMNS, CohortOptions, build_cohort, load_cohort
from mmbrca.data.labels import LabelMap
from mmbrca.errors import UserError


def test_cohort_files_and_columns(demo_cohort):
    path = demo_cohort.path
    assert {p.name for p in path.iterdir()} == {"cohort.json", "cohort.parquet", "expression.parquet", "folds.csv",
                                                 "dropped.csv"}
    cohort = load_cohort(path)
    assert list(cohort.table.columns) == COHORT_COLUMNS
    assert cohort.table["patient_id"].is_unique
    assert cohort.classes == ("Luminal", "Basal/Her2")
    assert set(cohort.table["class_name"]) == set(cohort.classes)
    assert (cohort.table["class_index"] == cohort.table["class_name"].map(cohort.classes.index)).all()


def test_folds_cover_every_kept_patient_exactly_once(demo_cohort):
    folds = pd.read_csv(demo_cohort.path / "folds.csv")
    table = pd.read_parquet(demo_cohort.path / "cohort.parquet")
    assert folds["patient_id"].is_unique
    assert sorted(folds["patient_id"]) == sorted(table["patient_id"])
    assert set(folds["fold"]) == set(range(5))
    per_fold = pd.crosstab(folds.set_index("patient_id")["fold"], table.set_index("patient_id")["class_name"])
    assert (per_fold > 0).all().all()
    assert (per_fold.max() - per_fold.min()).max() <= 1  # stratified


def test_modalities_match_the_raw_files(demo_raw, demo_cohort):
    header = (demo_raw / "expression.tsv").read_text().splitlines()[0].split("\t")[1:]
    tumour_patients = {parse_barcode(s).patient for s in header if parse_barcode(s).is_tumour}
    slide_names = [p.name for p in (demo_raw / "slides").iterdir()]
    table = demo_cohort.table.set_index("patient_id")
    for patient, row in table.iterrows():
        assert row["has_expression"] == (patient in tumour_patients)
        expected_slides = sorted(n for n in slide_names if n.startswith(patient))
        assert sorted(os.path.basename(p) for p in row["slide_paths"]) == expected_slides
        assert row["has_slide"] == bool(expected_slides)
        assert row["has_expression"] or row["has_slide"]
        assert all(os.path.isabs(p) for p in row["slide_paths"])
    assert not table["has_expression"].all() and not table["has_slide"].all()  # missing modalities are kept
    assert (table["n_slides"] > 1).any()  # several slides per patient
    assert table["site"].map(len).eq(2).all()  # TCGA tissue source site


def test_every_labelled_patient_is_kept_or_dropped_with_a_reason(demo_raw, demo_cohort):
    labels = pd.read_csv(demo_raw / "labels.csv", keep_default_na=False)
    dropped = pd.read_csv(demo_cohort.path / "dropped.csv")
    kept = set(demo_cohort.table["patient_id"])
    dropped_patients = set(dropped.loc[dropped["kind"] == "patient", "patient_id"])
    assert kept.isdisjoint(dropped_patients)
    assert set(labels["bcr_patient_barcode"]) <= kept | dropped_patients
    reasons = " | ".join(dropped["reason"])
    for expected in ("label 'BRCA.Normal' is dropped by the label map", "missing label",
                     "no label (not in the labels file)", "normal tissue (type 11) sample",
                     "replicate tumour sample; kept"):
        assert expected in reasons
    normal_labelled = set(labels.loc[labels["subtype"] == "BRCA.Normal", "bcr_patient_barcode"])
    assert normal_labelled and normal_labelled.isdisjoint(kept)


def test_aligned_expression_is_raw_and_matches_the_chosen_sample(demo_raw, demo_cohort):
    raw = pd.read_csv(demo_raw / "expression.tsv", sep="\t", index_col=0)
    cohort = load_cohort(demo_cohort.path)
    expression = cohort.expression()
    with_expression = cohort.table[cohort.table["has_expression"]]
    assert list(expression.index) == list(with_expression["patient_id"])
    for row in with_expression.head(5).itertuples():
        pd.testing.assert_series_equal(expression.loc[row.patient_id], raw[row.expression_sample].astype("float32"),
                                       check_names=False, rtol=1e-6)
    assert list(cohort.expression(genes=["ESR1|2099"]).columns) == ["ESR1|2099"]


def test_rebuild_is_up_to_date_and_different_cohort_is_refused(demo_raw, demo_cohort, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(demo_cohort.path, out)
    (out / "features").mkdir()  # added later by `mmbrca extract`: must survive a rebuild
    kwargs = dict(expression_path=demo_raw / "expression.tsv", labels_path=demo_raw / "labels.csv",
                  slides_dir=demo_raw / "slides")
    again = build_cohort(out, options=CohortOptions(label_map=LabelMap.default(), seed=3), **kwargs)
    assert again.up_to_date and (out / "features").is_dir()
    before = (out / "cohort.json").read_text()
    with pytest.raises(UserError, match="already holds a different cohort"):
        build_cohort(out, options=CohortOptions(label_map=LabelMap.default(), seed=4), **kwargs)
    assert (out / "cohort.json").read_text() == before


def test_site_preserved_on_the_demo(demo_raw, tmp_path):
    result = build_cohort(tmp_path / "c", expression_path=demo_raw / "expression.tsv",
                          labels_path=demo_raw / "labels.csv", slides_dir=demo_raw / "slides",
                          options=CohortOptions(label_map=LabelMap.default(), split="site-preserved"))
    joined = result.table.set_index("patient_id").join(result.folds)
    assert (joined.groupby("site")["fold"].nunique() == 1).all()
    assert json.loads((tmp_path / "c" / "cohort.json").read_text())["split"]["method"] == "site-preserved"


def test_gene_only_and_slide_only_cohorts(demo_raw, tmp_path):
    options = CohortOptions(label_map=LabelMap.default(), n_folds=3)
    genes = build_cohort(tmp_path / "g", expression_path=demo_raw / "expression.tsv",
                         labels_path=demo_raw / "labels.csv", slides_dir=None, options=options)
    assert genes.table["has_expression"].all() and not genes.table["has_slide"].any()
    slides = build_cohort(tmp_path / "s", expression_path=None, labels_path=demo_raw / "labels.csv",
                          slides_dir=demo_raw / "slides", options=options)
    assert slides.table["has_slide"].all() and not slides.table["has_expression"].any()
    assert not (tmp_path / "s" / "expression.parquet").exists()
    with pytest.raises(UserError, match="built without --expression"):
        load_cohort(tmp_path / "s").expression()


def test_non_tcga_ids_with_site_column_and_slide_prefix_matching(tmp_path):
    (tmp_path / "slides" / "sub").mkdir(parents=True)
    from mmbrca.wsi.synthetic import Stain, TissueStyle, render_he, write_aperio_svs
    import numpy as np

    rgb, _ = render_he(np.random.default_rng(0), (512, 512), TissueStyle(), Stain())
    write_aperio_svs(tmp_path / "slides" / "sub" / "P1_HE.svs", rgb, mpp=0.5, app_mag=20, downsamples=(4,))
    (tmp_path / "slides" / "P10.txt").write_text("not a slide")
    (tmp_path / "slides" / "P2.tiff").write_text("not a slide either")
    rows = [(f"P{i}", f"H{i % 3}", "LumA" if i % 2 else "Basal") for i in range(1, 13)]
    pd.DataFrame(rows, columns=["case", "hospital", "pam50"]).to_csv(tmp_path / "labels.csv", index=False)
    samples = [f"P{i}" for i in range(1, 13)]
    pd.DataFrame(np.random.default_rng(0).random((3, 12)), index=["G1", "G2", "G3"], columns=samples).to_csv(
        tmp_path / "expr.csv")
    result = build_cohort(tmp_path / "c", expression_path=tmp_path / "expr.csv", labels_path=tmp_path / "labels.csv",
                          slides_dir=tmp_path / "slides",
                          options=CohortOptions(label_map=LabelMap.default(), site_column="hospital", n_folds=3))
    table = result.table.set_index("patient_id")
    assert table.loc["P1", "has_slide"] and not table.loc["P10", "has_slide"]
    assert table.loc["P4", "site"] == "H1"
    assert "not a format OpenSlide can read" in " ".join(result.dropped["reason"])
