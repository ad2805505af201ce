"""The command line: bad input gives one line on stderr, exit code 2, and no partial output."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mmbrca.cli import cli

SUBTYPES = ["BRCA.LumA", "BRCA.Basal", "BRCA.LumB", "BRCA.Her2"]


def raw_inputs(root, n=12, labels=None):
    patients = [f"TCGA-A{i % 4}-{i:04d}" for i in range(n)]
    labels = labels or [SUBTYPES[i % 4] for i in range(n)]
    pd.DataFrame({"bcr_patient_barcode": patients, "subtype": labels}).to_csv(root / "labels.csv", index=False)
    samples = [f"{p}-01A-11R-A084-07" for p in patients]
    values = np.random.default_rng(0).gamma(2, 30, (5, n)).round(3)
    pd.DataFrame(values, index=[f"G{i}|{i}" for i in range(5)], columns=samples).rename_axis("gene_id").to_csv(
        root / "expr.tsv", sep="\t")
    return root / "expr.tsv", root / "labels.csv"


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mmbrca: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def assert_nothing_written(parent, name="out"):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_builds_a_cohort_and_prints_a_summary(tmp_path):
    expr, labels = raw_inputs(tmp_path)
    result = run(["cohort", tmp_path / "out", "--expression", expr, "--labels", labels, "--folds", "3"])
    assert result.exit_code == 0, result.output
    assert "patients: 12" in result.stdout and "patients per site and class" in result.stdout
    assert (tmp_path / "out" / "folds.csv").is_file()


def _edit_expression(path, value):
    frame = pd.read_csv(path, sep="\t", index_col=0)
    frame.iloc[2, 3] = value
    frame.to_csv(path, sep="\t")


def _corrupt_parquet(root):
    (root / "expr.parquet").write_bytes(b"PAR1 this is not parquet")
    return root / "expr.parquet"


@pytest.mark.parametrize("case", ["missing_labels", "missing_expression", "unreadable_expression", "unknown_label",
                                  "conflicting_labels", "nan", "inf", "no_overlap", "too_few_patients",
                                  "one_class", "bad_label_map", "no_inputs"])
def test_bad_input(tmp_path, case):
    expr, labels = raw_inputs(tmp_path)
    args = ["cohort", tmp_path / "out", "--expression", expr, "--labels", labels, "--folds", "3"]
    expected: tuple = ()
    if case == "missing_labels":
        args[5] = tmp_path / "nope.csv"
        expected = ("nope.csv", "labels file not found")
    elif case == "missing_expression":
        args[3] = tmp_path / "nope.tsv"
        expected = ("nope.tsv", "expression file not found")
    elif case == "unreadable_expression":
        args[3] = _corrupt_parquet(tmp_path)
        expected = ("expr.parquet", "cannot read expression file")
    elif case == "unknown_label":
        raw_inputs(tmp_path, labels=[SUBTYPES[i % 4] for i in range(11)] + ["LumC"])
        expected = ("labels.csv", "row 13", "'subtype'", "'LumC'")
    elif case == "conflicting_labels":
        frame = pd.read_csv(labels)
        frame.loc[len(frame)] = [frame.iloc[0, 0], "BRCA.Basal"]
        frame.to_csv(labels, index=False)
        expected = ("labels.csv", "row 14", "TCGA-A0-0000", "conflicting labels")
    elif case in ("nan", "inf"):
        _edit_expression(expr, np.nan if case == "nan" else np.inf)
        expected = ("expr.tsv", "NaN or infinite", "G2|2", "TCGA-A3-0003-01A-11R-A084-07")
    elif case == "no_overlap":
        pd.DataFrame({"bcr_patient_barcode": [f"TCGA-ZZ-{i:04d}" for i in range(12)],
                      "subtype": [SUBTYPES[i % 4] for i in range(12)]}).to_csv(labels, index=False)
        expected = ("expr.tsv", "no expression sample id matches a labelled patient")
    elif case == "too_few_patients":
        args[-1] = "13"
        expected = ("only 12 patients left for --folds 13",)
    elif case == "one_class":
        raw_inputs(tmp_path, labels=["BRCA.LumA"] * 6 + ["BRCA.Normal"] * 6)
        expected = ("only one class left", "'Luminal'")
    elif case == "bad_label_map":
        (tmp_path / "map.yaml").write_text("classes: [A, B]\nmap: {BRCA.LumA: C}\n")
        args += ["--label-map", tmp_path / "map.yaml"]
        expected = ("map.yaml", "'C', which is not in classes")
    elif case == "no_inputs":
        args = ["cohort", tmp_path / "out", "--labels", labels]
        expected = ("give --expression, --slides or both",)
    assert_user_error(run(args), *expected)
    assert_nothing_written(tmp_path)


def test_directory_with_a_different_cohort_is_refused_and_kept(tmp_path):
    expr, labels = raw_inputs(tmp_path)
    base = ["cohort", tmp_path / "out", "--expression", expr, "--labels", labels]
    assert run(base + ["--folds", "3"]).exit_code == 0
    manifest = (tmp_path / "out" / "cohort.json").read_bytes()
    assert "already up to date" in run(base + ["--folds", "3"]).stdout
    assert_user_error(run(base + ["--folds", "2"]), "out", "already holds a different cohort")
    assert (tmp_path / "out" / "cohort.json").read_bytes() == manifest
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert_user_error(run(["cohort", tmp_path / "other", "--expression", expr, "--labels", labels, "--folds", "3"]),
                      "not a cohort directory")


def test_console_script_reports_without_traceback(tmp_path):
    expr, labels = raw_inputs(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mmbrca", "cohort", str(tmp_path / "out"), "--expression",
                           str(tmp_path / "missing.tsv"), "--labels", str(labels)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mmbrca: error: {tmp_path / 'missing.tsv'}: expression file not found"]


def test_mlproject_empty_slides_means_gene_only(tmp_path):
    expr, labels = raw_inputs(tmp_path)
    result = run(["cohort", tmp_path / "out", "--expression", expr, "--labels", labels, "--slides", "", "--folds", "3"])
    assert result.exit_code == 0, result.output
    assert not pd.read_parquet(tmp_path / "out" / "cohort.parquet")["has_slide"].any()


def test_help_lists_the_commands():
    result = run(["--help"])
    assert result.exit_code == 0
    for command in ("demo-data", "cohort", "demo"):
        assert command in result.output
