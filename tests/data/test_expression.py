import numpy as np
import pandas as pd
import pytest

from mmbrca.data.expression import read_expression
from mmbrca.errors import UserError

PATIENTS = {"TCGA-A2-A0T2", "TCGA-A2-A0T3", "TCGA-BH-A0B1"}
SAMPLES = ["TCGA-A2-A0T2-01A-11R-A084-07", "TCGA-A2-A0T3-01A-11R-A084-07", "TCGA-BH-A0B1-01A-11R-A084-07"]
GENES = ["ESR1|2099", "KRT5|3852", "ERBB2|2064", "?|100130426"]


def matrix(genes=GENES, samples=SAMPLES, seed=0) -> pd.DataFrame:
    values = np.random.default_rng(seed).gamma(2.0, 50.0, (len(genes), len(samples))).round(4)
    return pd.DataFrame(values, index=pd.Index(genes, name="gene_id"), columns=samples)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".parquet", ".tsv.gz"])
@pytest.mark.parametrize("transpose", [False, True])
def test_orientation_detected_in_every_format(tmp_path, suffix, transpose):
    frame = matrix()
    written = frame.T if transpose else frame
    path = tmp_path / f"expr{suffix}"
    if suffix == ".parquet":
        written.to_parquet(path)
    else:
        written.to_csv(path, sep="," if suffix == ".csv" else "\t")
    result = read_expression(path, PATIENTS)
    assert result.orientation == ("samples-by-genes" if transpose else "genes-by-samples")
    assert list(result.values.columns) == GENES
    assert sorted(result.values.index) == sorted(PATIENTS)
    np.testing.assert_allclose(result.values.loc["TCGA-A2-A0T2"].to_numpy(), frame[SAMPLES[0]].to_numpy(), rtol=1e-6)


def test_parquet_without_index_uses_first_column(tmp_path):
    path = tmp_path / "expr.parquet"
    matrix().reset_index().to_parquet(path, index=False)
    assert list(read_expression(path, PATIENTS).values.columns) == GENES


def test_explicit_orientation_overrides_detection(tmp_path):
    path = tmp_path / "expr.tsv"
    matrix().to_csv(path, sep="\t")
    with pytest.raises(UserError, match="no expression sample id matches"):
        read_expression(path, PATIENTS, orientation="samples-by-genes").values.loc["TCGA-A2-A0T2"]
    assert read_expression(path, PATIENTS, orientation="genes-by-samples").orientation == "genes-by-samples"


def test_firehose_second_header_row_is_skipped(tmp_path):
    path = tmp_path / "data.txt"
    frame = matrix()
    lines = ["Hybridization REF\t" + "\t".join(SAMPLES), "gene_id\t" + "\t".join(["normalized_count"] * 3)]
    lines += [f"{g}\t" + "\t".join(str(v) for v in frame.loc[g]) for g in GENES]
    path.write_text("\n".join(lines) + "\n")
    result = read_expression(path, PATIENTS)
    assert result.values.shape == (3, 4)


def test_normals_dropped_and_one_replicate_kept(tmp_path):
    samples = SAMPLES + ["TCGA-A2-A0T2-11A-11R-A084-07", "TCGA-A2-A0T3-01B-11R-A084-07", "TCGA-A2-A0T3-06A-11R-A1-07"]
    path = tmp_path / "expr.tsv"
    matrix(samples=samples).to_csv(path, sep="\t")
    result = read_expression(path, PATIENTS)
    assert result.sample_of["TCGA-A2-A0T3"] == "TCGA-A2-A0T3-01A-11R-A084-07"
    assert result.sample_of["TCGA-A2-A0T2"] == "TCGA-A2-A0T2-01A-11R-A084-07"
    reasons = {d["id"]: d["reason"] for d in result.dropped}
    assert "normal tissue (type 11)" in reasons["TCGA-A2-A0T2-11A-11R-A084-07"]
    assert reasons["TCGA-A2-A0T3-01B-11R-A084-07"] == "replicate tumour sample; kept TCGA-A2-A0T3-01A-11R-A084-07"
    assert "TCGA-A2-A0T3-06A-11R-A1-07" in reasons


def test_a_patient_with_only_a_normal_sample_has_no_expression(tmp_path):
    path = tmp_path / "expr.tsv"
    matrix(samples=SAMPLES[:2] + ["TCGA-BH-A0B1-11A-11R-A084-07"]).to_csv(path, sep="\t")
    assert "TCGA-BH-A0B1" not in read_expression(path, PATIENTS).values.index


def test_duplicate_genes_rejected_or_merged(tmp_path):
    frame = matrix(genes=GENES + ["ESR1|2099"])
    path = tmp_path / "expr.tsv"
    frame.to_csv(path, sep="\t")
    with pytest.raises(UserError, match=r"1 duplicate gene ids, e.g. \['ESR1\|2099'\].*--duplicate-genes"):
        read_expression(path, PATIENTS)
    merged = read_expression(path, PATIENTS, duplicate_genes="mean").values
    expected = frame.loc["ESR1|2099"].mean(axis=0)
    np.testing.assert_allclose(merged["ESR1|2099"].to_numpy(), expected.to_numpy(), rtol=1e-6)
    first = read_expression(path, PATIENTS, duplicate_genes="first").values
    np.testing.assert_allclose(first["ESR1|2099"].to_numpy(), frame.iloc[0].to_numpy(), rtol=1e-6)
    assert list(first.columns) == GENES


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_gene_and_sample(tmp_path, bad):
    frame = matrix()
    frame.loc["KRT5|3852", SAMPLES[1]] = bad
    path = tmp_path / "expr.tsv"
    frame.to_csv(path, sep="\t")
    with pytest.raises(UserError, match=r"expr.tsv: 1 NaN or infinite expression values, e.g. gene\(s\) \['KRT5\|3852'\] "
                                        r"in sample\(s\) \['TCGA-A2-A0T3-01A-11R-A084-07'\]"):
        read_expression(path, PATIENTS)


def test_non_numeric_value_is_named(tmp_path):
    frame = matrix().astype(object)
    frame.loc["ERBB2|2064", SAMPLES[2]] = "12,5"
    path = tmp_path / "expr.tsv"
    frame.to_csv(path, sep="\t")
    with pytest.raises(UserError, match=r"non-numeric expression value '12,5' for gene 'ERBB2\|2064' in sample 'TCGA-BH-A0B1"):
        read_expression(path, PATIENTS)


def test_no_overlap_names_examples(tmp_path):
    path = tmp_path / "expr.tsv"
    matrix().to_csv(path, sep="\t")
    with pytest.raises(UserError, match="no expression sample id matches a labelled patient"):
        read_expression(path, {"TCGA-ZZ-0000", "TCGA-ZZ-0001"})


def test_duplicate_sample_ids_rejected(tmp_path):
    path = tmp_path / "expr.tsv"
    frame = matrix()
    frame.to_csv(path, sep="\t")
    text = path.read_text().splitlines()
    text[0] = text[0].replace(SAMPLES[1], SAMPLES[0])
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(UserError, match="TCGA-A2-A0T2-01A-11R-A084-07. appears more than once"):
        read_expression(path, PATIENTS)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="expression file not found"):
        read_expression(tmp_path / "nope.tsv", PATIENTS)
    bad = tmp_path / "expr.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match="cannot read expression file"):
        read_expression(bad, PATIENTS)
    with pytest.raises(UserError, match="unknown table format '.xlsx'"):
        read_expression(tmp_path / "x.xlsx", PATIENTS) if (tmp_path / "x.xlsx").write_text("") is not None else None
