"""Shared fixtures: one small demo dataset and its cohort per test session (real files, fixed seed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mmbrca.data.cohort import CohortOptions, build_cohort
from mmbrca.data.demo import DemoConfig, write_demo
from mmbrca.data.labels import LabelMap

SMALL_DEMO = DemoConfig(patients=40, sites=5, genes=300, seed=7, slide_width=1024, slide_height=1024)


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo") / "raw", SMALL_DEMO, progress=False)


@pytest.fixture(scope="session")
def feature_cohort(demo_cohort, tmp_path_factory) -> Path:
    """The demo cohort with tile features (random-init encoder, 8 tiles of 112 px per slide)."""
    import shutil

    from mmbrca.wsi.extract import ExtractOptions, extract_slides

    out = tmp_path_factory.mktemp("features") / "cohort"
    shutil.copytree(demo_cohort.path, out)
    slides = sorted({p for paths in demo_cohort.table["slide_paths"] for p in paths})
    options = ExtractOptions(weights="none", tiles_per_slide=8, tile_size=112, workers=1)
    result = extract_slides(slides, out / "features", options, progress=False)
    assert not result.failed
    return out


@pytest.fixture(scope="session")
def demo_cohort(demo_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    return build_cohort(out, expression_path=demo_raw / "expression.tsv", labels_path=demo_raw / "labels.csv",
                        slides_dir=demo_raw / "slides", options=CohortOptions(label_map=LabelMap.default(), seed=3))


def subprocess_env(tracking_uri: str) -> dict[str, str]:
    """Environment for a child process: this interpreter's bin first, a tracking store, no MLflow
    state leaked from runs of this test process (mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store for this test, in the environment and in this process."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
