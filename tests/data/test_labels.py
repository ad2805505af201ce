import pandas as pd
import pytest

from mmbrca.data.labels import LabelMap, read_labels
from mmbrca.errors import UserError


def write_csv(path, rows, columns=("bcr_patient_barcode", "subtype")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(("raw", "cls"), [("BRCA.LumA", "Luminal"), ("LumB", "Luminal"), ("BRCA_Basal", "Basal/Her2"),
                                          ("her2", "Basal/Her2"), (" BRCA.Her2 ", "Basal/Her2"),
                                          ("BRCA.Normal", None), ("Normal", None)])
def test_default_map(raw, cls):
    label_map = LabelMap.default()
    assert label_map.is_known(raw)
    assert label_map.resolve(raw) == cls
    assert label_map.positive_class == "Basal/Her2"


def test_unknown_label_is_not_known():
    assert not LabelMap.default().is_known("BRCA.Lum")


def test_yaml_override(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("classes: [LumA, Other]\nmap: {BRCA.LumA: LumA, BRCA.LumB: Other, BRCA.Basal: Other}\n"
                    "drop: [BRCA.Her2, BRCA.Normal]\n")
    label_map = LabelMap.from_yaml(path)
    assert label_map.classes == ("LumA", "Other")
    assert label_map.resolve("LumB") == "Other"
    assert label_map.resolve("BRCA.Her2") is None


@pytest.mark.parametrize(("text", "message"), [
    ("classes: [A]\nmap: {x: A}\n", "at least two distinct"),
    ("classes: [A, B]\nmap: {x: C}\n", "'C', which is not in classes"),
    ("classes: [A, B]\nmap: {x: A, X: B}\n", "two targets"),
    ("classes: [A, B]\nmap: {x: A}\ncolour: red\n", "unknown key 'colour'"),
    ("classes: [A, B]\n", "'map' must be"),
    ("[1, 2]\n", "must be a mapping"),
    ("classes: [A, B\n", "invalid YAML"),
])
def test_yaml_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "map.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        LabelMap.from_yaml(path)
    assert str(path) in str(info.value)


def test_read_labels_detects_columns_maps_and_tolerates_repeats(tmp_path):
    path = write_csv(tmp_path / "labels.csv", [
        ("TCGA-A2-A0T2", "BRCA.LumA"), ("TCGA-A2-A0T3-01A", "Basal"), ("TCGA-A2-A0T2", "BRCA.LumA"),
        ("TCGA-A2-A0T4", "NA"), ("TCGA-A2-A0T5", "BRCA.Normal"), ("TCGA-A2-A0T6", ""),
    ])
    frame = read_labels(path, LabelMap.default()).set_index("patient_id")
    assert list(frame.index) == ["TCGA-A2-A0T2", "TCGA-A2-A0T3", "TCGA-A2-A0T4", "TCGA-A2-A0T5", "TCGA-A2-A0T6"]
    assert frame.loc["TCGA-A2-A0T2", "class_name"] == "Luminal"
    assert frame.loc["TCGA-A2-A0T3", "class_name"] == "Basal/Her2"  # sample barcode → patient
    assert frame.loc["TCGA-A2-A0T4", "raw_label"] is None
    assert frame.loc["TCGA-A2-A0T5", "class_name"] is None and frame.loc["TCGA-A2-A0T5", "raw_label"] == "BRCA.Normal"


def test_unknown_label_names_row_column_and_value(tmp_path):
    path = write_csv(tmp_path / "labels.csv", [("TCGA-A2-A0T2", "BRCA.LumA"), ("TCGA-A2-A0T3", "BRCA.Lum")])
    with pytest.raises(UserError, match=r"labels.csv: row 3, column 'subtype': label 'BRCA.Lum' is not in the label map"):
        read_labels(path, LabelMap.default())


def test_conflicting_labels_name_both_rows(tmp_path):
    path = write_csv(tmp_path / "labels.csv", [("TCGA-A2-A0T2", "BRCA.LumA"), ("TCGA-A2-A0T3", "Basal"),
                                               ("TCGA-A2-A0T2-01A", "BRCA.Basal")])
    with pytest.raises(UserError, match=r"row 4.*TCGA-A2-A0T2 has conflicting labels 'BRCA.LumA' \(row 2\) and 'BRCA.Basal'"):
        read_labels(path, LabelMap.default())


def test_explicit_columns_and_site_column(tmp_path):
    path = tmp_path / "clin.tsv"
    path.write_text("case\tcentre\tpam\nP1\tH1\tLumA\nP2\tH2\tBasal\n")
    frame = read_labels(path, LabelMap.default(), id_column="case", label_column="pam", site_column="centre")
    assert frame.set_index("patient_id")["site"].to_dict() == {"P1": "H1", "P2": "H2"}
    with pytest.raises(UserError, match=r"no column 'nope' \(--label-column\)"):
        read_labels(path, LabelMap.default(), id_column="case", label_column="nope")


def test_undetectable_label_column_asks_for_option(tmp_path):
    path = tmp_path / "clin.csv"
    path.write_text("case,whatever\nP1,LumA\n")
    with pytest.raises(UserError, match="pass --label-column"):
        read_labels(path, LabelMap.default())
