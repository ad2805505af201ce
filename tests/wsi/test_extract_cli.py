"""`mmbrca extract COHORT` end to end: summary, exit code, failures.csv and the MLflow run."""

import shutil

import pandas as pd
import pytest
from click.testing import CliRunner

from mmbrca.cli import cli
from mmbrca.data.cohort import CohortOptions, build_cohort
from mmbrca.data.labels import LabelMap
from mmbrca.wsi.features import read_features

ARGS = ["--weights", "none", "--tiles-per-slide", "2", "--tile-size", "64", "--workers", "1"]


@pytest.fixture()
def own_cohort(demo_raw, tmp_path):
    """A cohort whose slide files belong to this test (so one can be damaged)."""
    shutil.copytree(demo_raw / "slides", tmp_path / "slides")
    build_cohort(tmp_path / "cohort", expression_path=demo_raw / "expression.tsv",
                 labels_path=demo_raw / "labels.csv", slides_dir=tmp_path / "slides",
                 options=CohortOptions(label_map=LabelMap.default()))
    return tmp_path / "cohort"


def test_extract_cli_tracks_a_run_and_fails_on_a_bad_slide(own_cohort, tracking):
    table = pd.read_parquet(own_cohort / "cohort.parquet")
    slides = sorted(p for paths in table["slide_paths"] for p in paths)
    damaged = slides[0]
    with open(damaged, "r+b") as fh:  # the file is damaged after the cohort was built
        fh.truncate(4000)
    result = CliRunner().invoke(cli, ["extract", str(own_cohort), *ARGS, "--experiment", "feat"])
    assert result.exit_code == 1, result.output
    assert f"{len(slides) - 1} done, 0 cached, 1 failed" in result.stdout
    assert "corrupt or truncated TIFF" in result.stderr and "failures.csv" in result.stderr
    failures = pd.read_csv(own_cohort / "features" / "failures.csv")
    assert failures["slide"].tolist() == [damaged]
    manifest = pd.read_json(own_cohort / "features" / "manifest.json", typ="series")
    assert damaged not in manifest["slides"] and len(manifest["slides"]) == len(slides) - 1
    for name in list(manifest["slides"].values())[:3]:
        assert read_features(own_cohort / "features" / name).features.shape == (2, 2048)

    client = tracking
    experiment = client.get_experiment_by_name("feat")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "extract/cohort"
    assert run.data.params["tiles_per_slide"] == "2" and run.data.params["weights"] == "none"
    assert run.data.metrics["slides_failed"] == 1 and run.data.metrics["tiles_encoded"] == 2 * (len(slides) - 1)
    assert run.data.metrics["tiles_per_second"] > 0
    assert run.data.tags["cohort_fingerprint"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"failures.csv", "manifest.json"}

    again = CliRunner().invoke(cli, ["extract", str(own_cohort), *ARGS, "--experiment", "feat"])
    assert f"0 done, {len(slides) - 1} cached, 1 failed" in again.stdout


def test_cohort_without_slides_is_a_user_error(demo_raw, tmp_path, tracking):
    build_cohort(tmp_path / "genes", expression_path=demo_raw / "expression.tsv", labels_path=demo_raw / "labels.csv",
                 slides_dir=None, options=CohortOptions(label_map=LabelMap.default()))
    result = CliRunner().invoke(cli, ["extract", str(tmp_path / "genes"), *ARGS])
    assert result.exit_code == 2
    assert "the cohort has no slides" in result.stderr
    result = CliRunner().invoke(cli, ["extract", str(tmp_path / "nothing"), *ARGS])
    assert result.exit_code == 2 and "not a cohort directory" in result.stderr
